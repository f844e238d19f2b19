//! The process's allocator, by measurement (docs/benchmarks.md, issue 21): mimalloc for blocks
//! under [`LARGE_BLOCK`], glibc malloc for larger ones. Under command load glibc spent about a third of
//! the writer's CPU in malloc, free and `malloc_consolidate` (mimalloc halves the writer's CPU
//! per command); but with mimalloc alone a 100 000-event replay and a reader's catch-up were
//! 1.3-1.6x slower. Large blocks (growing buffers, which glibc moves with `mremap` without
//! copying) back on glibc recover part of that (measured there too).
//!
//! The one crate allowed `unsafe`: implementing `GlobalAlloc` is unsafe by definition. It only
//! forwards to the two allocators and copies bytes between them.

/// Blocks of this size and larger go to the system allocator.
pub const LARGE_BLOCK: usize = 256 * 1024;

/// Small blocks to mimalloc, large ones to the system allocator. A block's size decides, and
/// `dealloc` and `realloc` are given the size it was allocated with, so a block always returns
/// to the allocator that made it.
pub struct SizeSplit;

unsafe impl std::alloc::GlobalAlloc for SizeSplit {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() >= LARGE_BLOCK {
            unsafe { std::alloc::System.alloc(layout) }
        } else {
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() >= LARGE_BLOCK {
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        } else {
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: std::alloc::Layout) {
        if layout.size() >= LARGE_BLOCK {
            unsafe { std::alloc::System.dealloc(pointer, layout) }
        } else {
            unsafe { mimalloc::MiMalloc.dealloc(pointer, layout) }
        }
    }

    unsafe fn realloc(
        &self,
        pointer: *mut u8,
        layout: std::alloc::Layout,
        new_size: usize,
    ) -> *mut u8 {
        let (was_large, is_large) = (layout.size() >= LARGE_BLOCK, new_size >= LARGE_BLOCK);
        if was_large && is_large {
            return unsafe { std::alloc::System.realloc(pointer, layout, new_size) };
        }
        if !was_large && !is_large {
            return unsafe { mimalloc::MiMalloc.realloc(pointer, layout, new_size) };
        }
        // Crossing the line: a new block from the other allocator, the bytes, the old one freed.
        let Ok(new_layout) = std::alloc::Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(pointer, moved, layout.size().min(new_size));
                self.dealloc(pointer, layout);
            }
        }
        moved
    }
}
