//! What the kernel says about the instance's links, read through the bpf
//! syscall: pins are a claim, the links' info is the truth.
//!
//! A link pinned in bpffs outlives what it was attached to: when its cgroup
//! is removed (systemd removes an emptied slice and makes it again) or the
//! link is detached (`bpftool link detach`), the pin stays and reports
//! cgroup id 0 or the id of a cgroup that no longer has the path. Each hook
//! is checked four ways: the link is there, it is attached to the cgroup
//! the path names now (by id), it runs the instance's pinned program, and
//! that program is in the kernel's list for the cgroup (`BPF_PROG_QUERY`).
//!
//! aya 0.14's `LinkInfo` has no cgroup id, so the info is read here.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use super::PROGRAMS;
use crate::paths::InstancePaths;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
/// `enum bpf_link_type`: a cgroup attachment.
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `enum bpf_attach_type` of each program in [`PROGRAMS`], in order.
pub(super) const ATTACH_TYPES: [u32; 6] = [
    10, // BPF_CGROUP_INET4_CONNECT
    11, // BPF_CGROUP_INET6_CONNECT
    14, // BPF_CGROUP_UDP4_SENDMSG
    15, // BPF_CGROUP_UDP6_SENDMSG
    8,  // BPF_CGROUP_INET4_BIND
    9,  // BPF_CGROUP_INET6_BIND
];

/// How one hook differs from what is wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkFault {
    /// No link pinned for the hook.
    Missing,
    /// The link is attached to no cgroup (its cgroup was removed, or it
    /// was detached).
    Detached,
    /// Attached to another cgroup than the path names now (that cgroup was
    /// removed and made again, or the link is on another one).
    Elsewhere { cgroup_id: u64 },
    /// The link runs another program than the instance's pinned one.
    OtherProgram { prog_id: u32 },
    /// The kernel does not list the program among the cgroup's.
    NotListed,
    /// The link or program could not be read.
    Unreadable(String),
}

impl std::fmt::Display for LinkFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkFault::Missing => f.write_str("no link is pinned"),
            LinkFault::Detached => f.write_str("its link is detached (attached to no cgroup)"),
            LinkFault::Elsewhere { cgroup_id } => write!(
                f,
                "its link is attached to cgroup id {cgroup_id}, not the one the path names now"
            ),
            LinkFault::OtherProgram { prog_id } => {
                write!(f, "its link runs program {prog_id}, not the instance's")
            }
            LinkFault::NotListed => f.write_str("the kernel does not list it on the cgroup"),
            LinkFault::Unreadable(why) => write!(f, "it cannot be read back: {why}"),
        }
    }
}

/// `struct bpf_link_info` up to its cgroup member (the kernel copies what
/// fits into a shorter buffer).
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// `struct bpf_prog_info` up to its id.
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr`'s `query` member, whole, with a zeroed tail: from 6.6
/// (the cgroup "mprog" change) the kernel writes `revision` back at offset
/// 56, past the older, shorter member; a longer attribute is accepted as
/// long as its tail is zero.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
    _tail: [u64; 8],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised `#[repr(C)]` prefix of `union
    // bpf_attr` for `cmd`, of the size passed; any pointer inside it points
    // to memory that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned bpf object.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn info<T: Default>(fd: &OwnedFd) -> io::Result<T> {
    let mut out = T::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: std::ptr::from_mut(&mut out) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(out)
}

/// Ids of the programs attached directly to `cgroup` on `attach_type`.
pub(super) fn attached_ids(cgroup: &Path, attach_type: u32) -> io::Result<Vec<u32>> {
    let dir = fs::File::open(cgroup)?;
    let mut room = 64;
    // More programs than room: the kernel says how many (ENOSPC), once.
    for _ in 0..2 {
        let mut ids = vec![0u32; room];
        let mut attr = QueryAttr {
            target_fd: dir.as_raw_fd() as u32,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..QueryAttr::default()
        };
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                ids.truncate((attr.prog_cnt as usize).min(ids.len()));
                return Ok(ids);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                room = (attr.prog_cnt as usize).clamp(room + 1, 1 << 16);
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ENOSPC))
}

/// What one hook's link is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkReport {
    pub hook: &'static str,
    /// `None`: attached as wanted.
    pub fault: Option<LinkFault>,
}

/// Reads back every hook's link against `cgroup` as the path names it now.
/// An empty fault list: every hook runs the instance's program on that
/// cgroup.
pub fn links(paths: &InstancePaths, cgroup: &Path) -> Vec<LinkReport> {
    let want = crate::host::cgroup_id(cgroup);
    PROGRAMS
        .iter()
        .zip(ATTACH_TYPES)
        .map(|(&hook, attach_type)| LinkReport {
            hook,
            fault: link_fault(paths, hook, attach_type, cgroup, want),
        })
        .collect()
}

fn link_fault(
    paths: &InstancePaths,
    hook: &'static str,
    attach_type: u32,
    cgroup: &Path,
    want: Option<u64>,
) -> Option<LinkFault> {
    let pin = paths.links_dir.join(hook);
    let link = match obj_get(&pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(LinkFault::Missing),
        Err(e) => return Some(LinkFault::Unreadable(format!("{}: {e}", pin.display()))),
    };
    let link: LinkInfo = match info(&link) {
        Ok(i) => i,
        // Kernels before 5.8 give no info on links: the pin, which holds
        // the link, is all that can be known there.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !crate::host::kernel_at_least(5, 8) => {
            return None
        }
        Err(e) => return Some(LinkFault::Unreadable(format!("{}: {e}", pin.display()))),
    };
    if link.link_type != BPF_LINK_TYPE_CGROUP {
        return Some(LinkFault::Unreadable(format!(
            "{} is a link of type {}, not a cgroup link",
            pin.display(),
            link.link_type
        )));
    }
    if link.cgroup_id == 0 {
        return Some(LinkFault::Detached);
    }
    if Some(link.cgroup_id) != want {
        return Some(LinkFault::Elsewhere {
            cgroup_id: link.cgroup_id,
        });
    }
    let prog_pin = paths.progs_dir.join(hook);
    let prog: ProgInfo = match obj_get(&prog_pin).and_then(|fd| info(&fd)) {
        Ok(i) => i,
        Err(e) => {
            return Some(LinkFault::Unreadable(format!(
                "{}: {e}",
                prog_pin.display()
            )))
        }
    };
    if prog.id != link.prog_id {
        return Some(LinkFault::OtherProgram {
            prog_id: link.prog_id,
        });
    }
    match attached_ids(cgroup, attach_type) {
        Ok(ids) if ids.contains(&prog.id) => None,
        Ok(_) => Some(LinkFault::NotListed),
        Err(e) => Some(LinkFault::Unreadable(format!(
            "query of {}: {e}",
            cgroup.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_info_prefixes_have_the_kernels_layout() {
        // struct bpf_link_info: type, id, prog_id, then an 8-aligned union
        // whose cgroup member is { __u64 cgroup_id; __u32 attach_type; }.
        assert_eq!(std::mem::offset_of!(LinkInfo, cgroup_id), 16);
        assert_eq!(std::mem::offset_of!(LinkInfo, attach_type), 24);
        assert_eq!(std::mem::offset_of!(ProgInfo, id), 4);
        assert_eq!(size_of::<ObjGetAttr>(), 16);
        assert_eq!(size_of::<InfoAttr>(), 16);
        assert_eq!(std::mem::offset_of!(QueryAttr, prog_ids), 16);
        assert_eq!(std::mem::offset_of!(QueryAttr, revision), 56);
    }

    #[test]
    fn a_missing_path_has_no_cgroup_id() {
        assert_eq!(
            crate::host::cgroup_id(Path::new("/nonexistent/loopguard")),
            None
        );
    }
}
