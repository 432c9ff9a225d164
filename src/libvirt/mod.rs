//! All libvirt FFI.
