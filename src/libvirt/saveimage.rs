//! libvirt's QEMU save image (what `virDomainSave` and an external memory snapshot write): a
//! header, the domain XML the image restores as, a cookie, then QEMU's migration stream.
//!
//! Standby verification restores a *copy* of a paused shadow from such an image. libvirt's
//! restore with a replacement XML checks ABI stability and refuses another name or UUID (and a
//! domain with the shadow's UUID cannot exist twice), so the copy's identity is written into
//! the image's own XML instead, in place: libvirt leaves room after the XML for exactly this
//! (`virsh save-image-define` grows it there). Layout (libvirt `src/qemu/qemu_saveimage.h`,
//! format version 2, stable on disk): 16-byte magic, then `u32` version, data_len,
//! was_running, format, cookieOffset and 14 unused words; `data_len` bytes of XML (NUL
//! terminated), cookie (NUL terminated) and zero padding; then the stream.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A finished image; `LibvirtQemudPart` marks one still being written.
const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
/// Magic plus 19 `u32` words.
const HEADER_LEN: usize = 16 + 19 * 4;
/// The only format version read: 2 (with a cookie), since libvirt 3.x.
const VERSION: u32 = 2;
/// Bound on the XML-and-cookie region read (libvirt pads it to tens of KiB).
const MAX_DATA_LEN: u32 = 16 << 20;

/// Errors reading or rewriting a save image.
#[derive(Debug, thiserror::Error)]
pub enum SaveImageError {
    /// The file could not be read or written.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a complete libvirt QEMU save image of the format we read.
    #[error("{} is not a save image we can rewrite: {why}", path.display())]
    Format {
        /// The image.
        path: PathBuf,
        /// What did not fit.
        why: String,
    },
    /// The new XML and the cookie do not fit in the room the image has for them.
    #[error("{} has room for {room} bytes of XML and cookie; {needed} are needed", path.display())]
    NoRoom {
        /// The image.
        path: PathBuf,
        /// Bytes available (`data_len`).
        room: u32,
        /// Bytes the new XML and the cookie take.
        needed: usize,
    },
}

/// The header fields we use, and the XML and cookie read from an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveImage {
    /// Bytes of XML, cookie and padding after the header.
    pub data_len: u32,
    /// Whether the guest was running when saved (a restore resumes it unless told otherwise).
    pub was_running: bool,
    /// The domain XML the image restores as.
    pub xml: String,
    /// libvirt's cookie (CPU model and the like), kept as it is.
    pub cookie: Vec<u8>,
    /// Words after the XML region's description, kept as they are (format, unused).
    rest: Vec<u8>,
}

fn words(b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Up to the first NUL.
fn until_nul(b: &[u8]) -> &[u8] {
    b.split(|c| *c == 0).next().unwrap_or(b)
}

impl SaveImage {
    /// Parses the header, XML and cookie of an image from its first bytes.
    pub fn parse(path: &Path, head: &[u8]) -> Result<Self, SaveImageError> {
        let bad = |why: String| SaveImageError::Format {
            path: path.to_path_buf(),
            why,
        };
        if head.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, shorter than a header", head.len())));
        }
        if &head[..16] != MAGIC {
            return Err(bad(format!(
                "magic {:?} (an unfinished image reads LibvirtQemudPart)",
                String::from_utf8_lossy(&head[..16])
            )));
        }
        let w: Vec<u32> = words(&head[16..HEADER_LEN]).collect();
        let (version, data_len, was_running, cookie_offset) = (w[0], w[1], w[2], w[4]);
        if version != VERSION {
            return Err(bad(format!("format version {version}, not {VERSION}")));
        }
        if data_len > MAX_DATA_LEN || head.len() < HEADER_LEN + data_len as usize {
            return Err(bad(format!(
                "data length {data_len} beyond the {} bytes read",
                head.len() - HEADER_LEN
            )));
        }
        let data = &head[HEADER_LEN..HEADER_LEN + data_len as usize];
        if cookie_offset == 0 || cookie_offset >= data_len {
            return Err(bad(format!(
                "cookie offset {cookie_offset} outside the data ({data_len} bytes)"
            )));
        }
        let xml = until_nul(&data[..cookie_offset as usize]);
        let xml = std::str::from_utf8(xml)
            .map_err(|e| bad(format!("its XML is not UTF-8: {e}")))?
            .to_string();
        Ok(SaveImage {
            data_len,
            was_running: was_running != 0,
            xml,
            cookie: until_nul(&data[cookie_offset as usize..]).to_vec(),
            rest: head[16 + 12..HEADER_LEN].to_vec(),
        })
    }

    /// Reads the header, XML and cookie of the image at `path`.
    pub fn read(path: &Path) -> Result<Self, SaveImageError> {
        let io = |what| {
            move |source| SaveImageError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut f = File::open(path).map_err(io("open"))?;
        let mut head = vec![0u8; HEADER_LEN];
        f.read_exact(&mut head).map_err(io("read the header of"))?;
        let data_len = words(&head[20..24]).next().unwrap_or(0);
        if data_len <= MAX_DATA_LEN {
            head.resize(HEADER_LEN + data_len as usize, 0);
            f.read_exact(&mut head[HEADER_LEN..])
                .map_err(io("read the XML of"))?;
        }
        Self::parse(path, &head)
    }

    /// The header and data region with `xml` in place of the image's XML: same length
    /// (`data_len`), so the stream after it stays where it is.
    pub fn with_xml(&self, path: &Path, xml: &str) -> Result<Vec<u8>, SaveImageError> {
        let needed = xml.len() + 1 + self.cookie.len() + 1;
        if needed > self.data_len as usize || xml.as_bytes().contains(&0) {
            return Err(SaveImageError::NoRoom {
                path: path.to_path_buf(),
                room: self.data_len,
                needed,
            });
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.data_len as usize);
        out.extend_from_slice(MAGIC);
        for w in [VERSION, self.data_len, u32::from(self.was_running)] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.rest[..4]);
        out.extend_from_slice(&(xml.len() as u32 + 1).to_le_bytes());
        out.extend_from_slice(&self.rest[8..]);
        out.extend_from_slice(xml.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.cookie);
        out.resize(HEADER_LEN + self.data_len as usize, 0);
        Ok(out)
    }

    /// Writes `xml` into the image at `path` in place of its XML (see [`Self::with_xml`]).
    pub fn rewrite_xml(path: &Path, xml: &str) -> Result<(), SaveImageError> {
        let image = Self::read(path)?;
        let head = image.with_xml(path, xml)?;
        let io = |what| {
            move |source| SaveImageError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io("open for writing"))?;
        f.seek(SeekFrom::Start(0)).map_err(io("seek in"))?;
        f.write_all(&head).map_err(io("rewrite the XML of"))?;
        f.sync_data().map_err(io("sync"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header and data region of an image written by libvirt 9.0 (an external memory
    /// snapshot of the paused lab guest), without the migration stream.
    fn fixture() -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("src/libvirt/fixtures/save-image-head.bin"),
        )
        .unwrap()
    }

    #[test]
    fn reads_the_xml_and_cookie_of_a_real_image() {
        let img = SaveImage::parse(Path::new("f"), &fixture()).unwrap();
        assert!(!img.was_running);
        assert!(img.xml.starts_with("<domain type='qemu'>"), "{}", img.xml);
        assert!(img.xml.contains("<name>exps</name>"));
        assert!(img.xml.trim_end().ends_with("</domain>"));
        assert!(
            String::from_utf8_lossy(&img.cookie).starts_with("<cookie>"),
            "{:?}",
            String::from_utf8_lossy(&img.cookie)
        );
    }

    #[test]
    fn with_xml_keeps_the_stream_offset_and_round_trips() {
        let head = fixture();
        let img = SaveImage::parse(Path::new("f"), &head).unwrap();
        let xml = img
            .xml
            .replace("<name>exps</name>", "<name>exps-verify</name>");
        let out = img.with_xml(Path::new("f"), &xml).unwrap();
        assert_eq!(out.len(), HEADER_LEN + img.data_len as usize);
        // Everything but the cookie offset is as libvirt wrote it.
        assert_eq!(out[..32], head[..32]);
        assert_eq!(out[36..HEADER_LEN], head[36..HEADER_LEN]);
        let again = SaveImage::parse(Path::new("f"), &out).unwrap();
        assert_eq!(again.xml, xml);
        assert_eq!(again.cookie, img.cookie);
        assert_eq!(again.data_len, img.data_len);
    }

    #[test]
    fn refuses_what_it_cannot_rewrite() {
        let head = fixture();
        let p = Path::new("f");
        let img = SaveImage::parse(p, &head).unwrap();
        let huge = "x".repeat(img.data_len as usize);
        assert!(matches!(
            img.with_xml(p, &huge),
            Err(SaveImageError::NoRoom { .. })
        ));
        let mut partial = head.clone();
        partial[..16].copy_from_slice(b"LibvirtQemudPart");
        assert!(matches!(
            SaveImage::parse(p, &partial),
            Err(SaveImageError::Format { .. })
        ));
        let mut v3 = head.clone();
        v3[16..20].copy_from_slice(&3u32.to_le_bytes());
        assert!(SaveImage::parse(p, &v3).is_err());
        assert!(SaveImage::parse(p, &head[..50]).is_err());
        let mut bad_cookie = head.clone();
        bad_cookie[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(SaveImage::parse(p, &bad_cookie).is_err());
        let mut long = head;
        long[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(SaveImage::parse(p, &long).is_err());
    }
}
