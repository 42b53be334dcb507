//! Batched map operations (`BPF_MAP_*_BATCH`, Linux 5.6+): one syscall for
//! thousands of entries, where aya 0.14 offers one per entry. A policy
//! slot of 10,000 services is ~100,000 entries; one by one that is a
//! noticeable part of `apply`.
//!
//! Every function falls back to nothing: callers use the per-entry path
//! when the kernel refuses the batch command for a map type.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{maps::MapData, Pod};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn raw_fd(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: the kernel reads and writes `attr` (of the size passed) and
    // the buffers it points to, which the callers size for `count` entries.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether an error means "this kernel or map type has no batch command".
pub(super) fn unsupported(e: &io::Error) -> bool {
    // ENOTSUPP (524) is the kernel-internal code some map types return.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

/// Writes `keys[i] -> values[i]` (maps that are not per-CPU).
pub(super) fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(io::Error::other)?,
        map_fd: raw_fd(map),
        ..BatchAttr::default()
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)
}

/// Deletes `keys` (hash maps).
pub(super) fn delete<K: Pod>(map: &MapData, keys: &[K]) -> io::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(io::Error::other)?,
        map_fd: raw_fd(map),
        ..BatchAttr::default()
    };
    bpf(BPF_MAP_DELETE_BATCH, &mut attr)
}

/// Every entry of a hash map.
pub(super) fn entries<K: Pod, V: Pod>(
    map: &MapData,
    max_entries: usize,
) -> io::Result<Vec<(K, V)>> {
    let chunk = max_entries.clamp(1, 4096);
    let mut out = Vec::new();
    // SAFETY: Pod types are plain bytes; all-zero is a valid value.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
    // SAFETY: as for the keys.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
    let mut token = 0u64;
    let mut first = true;
    loop {
        let mut next = 0u64;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut token) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: raw_fd(map),
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(chunk);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match result {
            Ok(()) => {}
            // The last chunk.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

/// Up to `len` entries of an array as the kernel returned them: `(index,
/// value)`. The generic batch lookup begins after the key it is given
/// (indexes `start + 1 ..= start + len`) and stops at the end of the
/// array, so the caller reads whatever it needs that is missing (index
/// `start` at least) one by one.
pub(super) fn array_range<V: Pod>(
    map: &MapData,
    start: u32,
    len: usize,
) -> io::Result<Vec<(u32, V)>> {
    let mut keys = vec![0u32; len];
    // SAFETY: Pod types are plain bytes; all-zero is a valid value.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; len];
    let mut token = start;
    let mut next = 0u32;
    let mut attr = BatchAttr {
        in_batch: std::ptr::from_mut(&mut token) as u64,
        out_batch: std::ptr::from_mut(&mut next) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: u32::try_from(len).map_err(io::Error::other)?,
        map_fd: raw_fd(map),
        ..BatchAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        // ENOENT: the range reached the end of the array.
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => {
            let read = (attr.count as usize).min(len);
            Ok(keys.into_iter().zip(values).take(read).collect())
        }
    }
}
