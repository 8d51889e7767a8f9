/*
 * mapread.h - read a file by mapping it, and survive the file shrinking underneath.
 *
 * Plain C99 plus POSIX, no Python.h. Every symbol is prefixed ddp_map_.
 *
 * Why: reading a snapshot with read(2) copies every byte from the page cache into the
 * process, and on a busy two-core machine that copy was a sixth of the CPU time of a
 * backup of unchanged data. A shared read-only mapping hands the chunker and the hashes
 * the page-cache pages themselves; nothing is copied.
 *
 * The price of a mapping: touching a page that lies wholly past the end of the file
 * raises SIGBUS (so does a page the storage fails to read), and a database file may be
 * truncated by its owner while a backup reads it. A process-wide SIGBUS handler (installed by ddp_map_install) looks the faulting
 * address up among the windows mapped here. If it lies in one, the handler maps zero
 * pages over the rest of that window (MAP_FIXED, anonymous, read-only), sets the
 * window's `torn` flag and returns, so the faulting load is retried and reads zeros.
 * The caller must then treat everything read from that window as unusable (dedupe fails
 * the backup before its commit point). A fault anywhere else is passed on to the
 * handler that was installed before (Python's faulthandler, or the default action, which
 * kills the process as it would have without this module).
 *
 * Thread safety: windows may be mapped and released from any thread; the handler runs
 * in whichever thread faulted and reads the window table with atomic loads.
 */
#ifndef DDP_MAPREAD_H
#define DDP_MAPREAD_H

#include <stddef.h>
#include <stdint.h>

/* How many windows may be mapped at once, process-wide. ddp_map_window fails with
 * EBUSY beyond that; callers fall back to read(2). */
#define DDP_MAP_SLOTS 256

/* Install (or re-install, if something replaced it since) the SIGBUS handler. Returns 0
 * or an errno value. Call before ddp_map_window; cheap when already installed. */
int ddp_map_install(void);

/* Map `len` bytes of fd from `offset` (a multiple of the page size) read-only, and
 * prefault them where the platform can. `torn` is set to 1 by the handler if any byte of
 * the window is found past the end of the file; it must stay valid until the window is
 * released. Returns the address, or NULL with *err set (EBUSY: no free slot). */
void *ddp_map_window(int fd, uint64_t offset, size_t len, volatile int *torn, int *err);

/* Unmap a window from ddp_map_window (the same address and length). */
void ddp_map_release(void *addr, size_t len);

/* The system page size (the unit of offsets). */
size_t ddp_map_page_size(void);

#endif
