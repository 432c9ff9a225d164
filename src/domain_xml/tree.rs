//! Small navigation and editing helpers over a `xot` tree.
//!
//! libvirt's own elements and attributes are never namespaced, so these helpers match plain
//! (namespace-less) names only; foreign elements are matched explicitly by namespace where
//! needed. Editing keeps the surrounding indentation so that a rewritten document still looks
//! like `virsh dumpxml` output.
//!
//! The xot manipulation calls used here fail only for structurally impossible operations
//! (inserting under a text node, giving the document node a sibling, inserting a node that is
//! already attached). Every helper is called with an element that has a parent element and a
//! freshly created, unattached new node, so those failures are programming errors and are
//! reported by panicking with a `BUG:` message rather than threaded through every setter.

use xot::{NameId, Node, NodeEdge, Value, Xot};

/// `(local name, namespace URI)` of an element, `None` for non-elements.
pub(super) fn element_name(xot: &Xot, node: Node) -> Option<(&str, &str)> {
    let element = xot.element(node)?;
    let (local, ns) = xot.name_ns_str(element.name());
    Some((local, ns))
}

/// Whether `node` is the libvirt (namespace-less) element `local`.
pub(super) fn is_plain(xot: &Xot, node: Node, local: &str) -> bool {
    matches!(element_name(xot, node), Some((l, "")) if l == local)
}

/// Element children of `parent`, in document order.
pub(super) fn element_children(xot: &Xot, parent: Node) -> impl Iterator<Item = Node> + '_ {
    xot.children(parent).filter(move |n| xot.is_element(*n))
}

/// Plain element children of `parent` named `local`.
pub(super) fn children_named<'a>(
    xot: &'a Xot,
    parent: Node,
    local: &'a str,
) -> impl Iterator<Item = Node> + 'a {
    xot.children(parent)
        .filter(move |n| is_plain(xot, *n, local))
}

/// First plain element child of `parent` named `local`.
pub(super) fn child_named(xot: &Xot, parent: Node, local: &str) -> Option<Node> {
    children_named(xot, parent, local).next()
}

/// Value of the namespace-less attribute `name`.
pub(super) fn attr<'a>(xot: &'a Xot, node: Node, name: &str) -> Option<&'a str> {
    if !xot.is_element(node) {
        return None;
    }
    // A name that was never interned cannot be on any element.
    let id = xot.name(name)?;
    xot.get_attribute(node, id)
}

/// Attribute `name` of the first child element `child`, e.g. `<source file=.../>`.
pub(super) fn child_attr<'a>(xot: &'a Xot, node: Node, child: &str, name: &str) -> Option<&'a str> {
    child_named(xot, node, child).and_then(|c| attr(xot, c, name))
}

/// Sets a namespace-less attribute on an element.
pub(super) fn set_attr(xot: &mut Xot, node: Node, name: &str, value: &str) {
    let id = xot.add_name(name);
    xot.set_attribute(node, id, value);
}

/// Removes a namespace-less attribute if present.
pub(super) fn remove_attr(xot: &mut Xot, node: Node, name: &str) {
    if let Some(id) = xot.name(name) {
        xot.remove_attribute(node, id);
    }
}

/// Concatenated direct text children of an element (comments and child elements skipped).
pub(super) fn text(xot: &Xot, node: Node) -> String {
    xot.children(node).filter_map(|c| xot.text_str(c)).collect()
}

/// Replaces the text content of an element that holds only text (e.g. `<name>`).
pub(super) fn set_text(xot: &mut Xot, node: Node, value: &str) {
    let texts: Vec<Node> = xot.children(node).filter(|c| xot.is_text(*c)).collect();
    for t in texts {
        remove(xot, t);
    }
    xot.append_text(node, value)
        .expect("BUG: appending text to an element cannot fail");
}

/// A new unattached, namespace-less element.
pub(super) fn new_element(xot: &mut Xot, local: &str) -> Node {
    let name = xot.add_name(local);
    xot.new_element(name)
}

/// Whitespace-only text immediately before `node`: the indentation of that line.
fn indentation_before(xot: &Xot, node: Node) -> Option<String> {
    let prev = xot.previous_sibling(node)?;
    let text = xot.text_str(prev)?;
    text.chars()
        .all(char::is_whitespace)
        .then(|| text.to_string())
}

/// Inserts `new` right after the element `reference`, on its own line with the same
/// indentation.
pub(super) fn insert_after(xot: &mut Xot, reference: Node, new: Node) {
    let indent = indentation_before(xot, reference);
    xot.insert_after(reference, new)
        .expect("BUG: inserting after an element that has a parent cannot fail");
    if let Some(indent) = indent {
        // Inserted between two elements, so xot cannot merge it into another text node.
        let ws = xot.new_text(&indent);
        xot.insert_before(new, ws)
            .expect("BUG: inserting before an attached element cannot fail");
    }
}

/// Inserts `new` right before the element `reference`, with the same indentation.
pub(super) fn insert_before(xot: &mut Xot, reference: Node, new: Node) {
    let indent = indentation_before(xot, reference);
    xot.insert_before(reference, new)
        .expect("BUG: inserting before an element that has a parent cannot fail");
    if let Some(indent) = indent {
        let ws = xot.new_text(&indent);
        xot.insert_before(reference, ws)
            .expect("BUG: inserting before an attached element cannot fail");
    }
}

/// Appends `new` as the last element child of `parent`, indented like its siblings (or one
/// level deeper than `parent` when it has no element children yet).
pub(super) fn append_element(xot: &mut Xot, parent: Node, new: Node) {
    if let Some(last) = element_children(xot, parent).last() {
        insert_after(xot, last, new);
        return;
    }
    let closing = xot
        .last_child(parent)
        .filter(|c| is_whitespace_text(xot, *c));
    let outer = match closing {
        Some(c) => xot.text_str(c).map(str::to_string),
        None => indentation_before(xot, parent),
    };
    match closing {
        Some(c) => xot
            .insert_before(c, new)
            .expect("BUG: inserting before an attached text node cannot fail"),
        None => {
            xot.append(parent, new)
                .expect("BUG: appending a new element to an element cannot fail");
            if let Some(outer) = &outer {
                // After an element, so it cannot merge with another text node.
                xot.append_text(parent, outer)
                    .expect("BUG: appending text to an element cannot fail");
            }
        }
    }
    if let Some(outer) = outer {
        // Between an element and either nothing or `parent`'s start: no text to merge with.
        let ws = xot.new_text(&format!("{outer}  "));
        xot.insert_before(new, ws)
            .expect("BUG: inserting before an attached element cannot fail");
    }
}

fn is_whitespace_text(xot: &Xot, node: Node) -> bool {
    xot.text_str(node)
        .is_some_and(|t| t.chars().all(char::is_whitespace))
}

/// Removes a node; for an element also the indentation in front of it, so no blank line stays,
/// and if that leaves `parent` with only whitespace, the whitespace too (so it prints `<x/>`).
pub(super) fn remove(xot: &mut Xot, node: Node) {
    let parent = xot.parent(node);
    if xot.is_element(node) {
        if let Some(prev) = xot.previous_sibling(node) {
            if is_whitespace_text(xot, prev) {
                xot.remove(prev)
                    .expect("BUG: removing an attached text node cannot fail");
            }
        }
    }
    xot.remove(node)
        .expect("BUG: removing an attached non-document node cannot fail");
    if let Some(parent) = parent.filter(|p| xot.is_element(*p)) {
        let children: Vec<Node> = xot.children(parent).collect();
        if children.iter().all(|c| is_whitespace_text(xot, *c)) {
            for c in children {
                xot.remove(c)
                    .expect("BUG: removing an attached text node cannot fail");
            }
        }
    }
}

/// Whether an element has neither attributes nor children.
pub(super) fn is_bare(xot: &Xot, node: Node) -> bool {
    xot.attributes(node).is_empty() && xot.first_child(node).is_none()
}

/// Returns the child `local` of `parent`, creating an empty one at the end if missing.
pub(super) fn ensure_child(xot: &mut Xot, parent: Node, local: &str) -> Node {
    if let Some(c) = child_named(xot, parent, local) {
        return c;
    }
    let el = new_element(xot, local);
    append_element(xot, parent, el);
    el
}

/// A copy of `node` and its descendants as the detached top node of a new tree: what
/// `Xot::clone_node` makes, without copying the whole document into a scratch tree first
/// (which cost a copy of the document per NIC serialized). Names, prefixes and namespaces are
/// interned in the new tree by their text; as with `clone_node`, only the namespace
/// declarations made inside the subtree come along. Iterative: a subtree may nest deeply.
pub(super) fn copy_subtree(src: &Xot, node: Node) -> (Xot, Node) {
    fn name(src: &Xot, dst: &mut Xot, id: NameId) -> NameId {
        let (local, uri) = src.name_ns_str(id);
        let ns = dst.add_namespace(uri);
        dst.add_name_ns(local, ns)
    }
    let mut dst = Xot::new();
    let mut open: Vec<Node> = Vec::new();
    let mut top = None;
    for edge in src.traverse(node) {
        let n = match edge {
            NodeEdge::Start(n) => n,
            NodeEdge::End(n) => {
                if src.is_element(n) {
                    open.pop();
                }
                continue;
            }
        };
        let new = match src.value(n) {
            Value::Element(e) => {
                let element = name(src, &mut dst, e.name());
                let el = dst.new_element(element);
                let mut decls: Vec<(&str, &str)> = src
                    .namespaces(n)
                    .iter()
                    .map(|(p, ns)| (src.prefix_str(p), src.namespace_str(*ns)))
                    .collect();
                // The copy's root also declares the prefixes its names take from the source's
                // ancestors (a `qemu:` attribute on a NIC, declared on <domain>): without them
                // it cannot be serialized. Sorted: they come from a hash map.
                if n == node {
                    let mut inherited: Vec<(&str, &str)> = src
                        .inherited_prefixes(n)
                        .iter()
                        .map(|(p, ns)| (src.prefix_str(*p), src.namespace_str(*ns)))
                        .collect();
                    inherited.sort_unstable();
                    decls.extend(inherited);
                }
                for (p, ns) in decls {
                    let p = dst.add_prefix(p);
                    let ns = dst.add_namespace(ns);
                    dst.namespaces_mut(el).insert(p, ns);
                }
                for (attr, value) in src.attributes(n).iter() {
                    let a = name(src, &mut dst, attr);
                    dst.attributes_mut(el).insert(a, value.clone());
                }
                el
            }
            Value::Text(t) => dst.new_text(t.get()),
            Value::Comment(c) => dst.new_comment(c.get()),
            Value::ProcessingInstruction(pi) => {
                let target = name(src, &mut dst, pi.target());
                dst.new_processing_instruction(target, pi.data())
            }
            // Neither is met below an element by `traverse`; copying from the document node
            // is not what this is for.
            Value::Document | Value::Attribute(_) | Value::Namespace(_) => {
                panic!("BUG: copy_subtree copies elements and their content")
            }
        };
        match open.last() {
            Some(parent) => dst
                .append(*parent, new)
                .expect("BUG: appending a new node to a copied element cannot fail"),
            None => top = Some(new),
        }
        if src.is_element(n) {
            open.push(new);
        }
    }
    let top = top.expect("BUG: traverse starts at the node itself");
    (dst, top)
}

/// A short human label for an element, for error messages: its start tag with attributes,
/// e.g. `<interface type='direct'>`.
pub(super) fn start_tag(xot: &Xot, node: Node) -> String {
    let Some((local, ns)) = element_name(xot, node) else {
        return "<?>".to_string();
    };
    let mut out = String::from("<");
    if !ns.is_empty() {
        out.push('{');
        out.push_str(ns);
        out.push('}');
    }
    out.push_str(local);
    for (name, value) in xot.attributes(node).iter() {
        let (l, _) = xot.name_ns_str(name);
        out.push_str(&format!(" {l}='{}'", clip(value, 80)));
    }
    out.push('>');
    out
}

/// Clips untrusted text before it goes into an error message.
pub(super) fn clip(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(max_chars).collect();
        c.push('…');
        c
    }
}
