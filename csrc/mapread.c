/*
 * mapread.c - see mapread.h for the contract.
 *
 * The window table is read by a signal handler that may run in any thread at any
 * moment, so each slot is published under a sequence counter (odd while it is being
 * written): the handler skips a slot whose counter is odd or changed while it read it.
 * Skipping is safe because the window that faulted is in use by the faulting thread, so
 * its own slot is stable; only slots of other windows can be changing.
 *
 * mmap(2) is not on POSIX's list of async-signal-safe functions, but on Linux (and the
 * BSDs) it is a plain system call that takes no user-space lock, which is what matters
 * inside a handler.
 */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS, MAP_POPULATE and siginfo_t under -std=c99 */

#include "mapread.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MAP_POPULATE
#define MAP_POPULATE 0 /* prefaulting is an optimisation; without it pages fault in */
#endif

struct ddp_map_slot {
    unsigned seq;         /* odd while the slot is being written */
    int busy;             /* claimed by a window (set before, cleared after publishing) */
    uintptr_t start, end; /* the window, [start, end); start 0 when free */
    volatile int *torn;
};

static struct ddp_map_slot slots[DDP_MAP_SLOTS];
static struct sigaction previous; /* the SIGBUS action installed before ours */
static size_t page_size;

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static void pass_on(int sig, siginfo_t *info, void *context)
{
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, context);
            return;
        }
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* The default action: restore it and return. The faulting instruction runs again
     * and the process ends exactly as it would have without this handler. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
}

/* The slot whose window holds addr, read consistently; 0 if none. */
static int find_window(uintptr_t addr, uintptr_t *end, volatile int **torn)
{
    for (size_t i = 0; i < DDP_MAP_SLOTS; i++) {
        struct ddp_map_slot *s = &slots[i];
        unsigned before = LOAD(&s->seq);
        if (before & 1u)
            continue;
        uintptr_t start = LOAD(&s->start);
        uintptr_t stop = LOAD(&s->end);
        volatile int *flag = LOAD(&s->torn);
        if (LOAD(&s->seq) != before)
            continue;
        if (start != 0 && start <= addr && addr < stop) {
            *end = stop;
            *torn = flag;
            return 1;
        }
    }
    return 0;
}

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    uintptr_t end;
    volatile int *torn;
    if (info != NULL && info->si_code == BUS_ADRERR &&
        find_window((uintptr_t)info->si_addr, &end, &torn)) {
        uintptr_t from = (uintptr_t)info->si_addr & ~(uintptr_t)(page_size - 1);
        void *zeros = mmap((void *)from, end - from, PROT_READ,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (zeros != MAP_FAILED) {
            *torn = 1;
            errno = saved_errno;
            return; /* the load runs again and reads zeros */
        }
    }
    errno = saved_errno;
    pass_on(sig, info, context);
}

size_t ddp_map_page_size(void)
{
    if (page_size == 0) {
        long ps = sysconf(_SC_PAGESIZE);
        page_size = ps > 0 ? (size_t)ps : 4096;
    }
    return page_size;
}

int ddp_map_install(void)
{
    struct sigaction now, mine;
    ddp_map_page_size(); /* sysconf is not async-signal-safe: the handler uses the cache */
    if (sigaction(SIGBUS, NULL, &now) != 0)
        return errno;
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus)
        return 0;
    /* Ours is not installed, so no handler reads `previous` while it is written. */
    previous = now;
    memset(&mine, 0, sizeof mine);
    mine.sa_sigaction = on_sigbus;
    mine.sa_flags = SA_SIGINFO;
    sigemptyset(&mine.sa_mask);
    return sigaction(SIGBUS, &mine, NULL) != 0 ? errno : 0;
}

static struct ddp_map_slot *claim_slot(void)
{
    for (size_t i = 0; i < DDP_MAP_SLOTS; i++) {
        int expected = 0;
        if (__atomic_compare_exchange_n(&slots[i].busy, &expected, 1, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED))
            return &slots[i];
    }
    return NULL;
}

void *ddp_map_window(int fd, uint64_t offset, size_t len, volatile int *torn, int *err)
{
    struct ddp_map_slot *s = claim_slot();
    if (s == NULL) {
        *err = EBUSY;
        return NULL;
    }
    void *addr = mmap(NULL, len, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, (off_t)offset);
    if (addr == MAP_FAILED) {
        *err = errno;
        STORE(&s->busy, 0);
        return NULL;
    }
    STORE(&s->seq, s->seq + 1u);
    STORE(&s->torn, torn);
    STORE(&s->end, (uintptr_t)addr + len);
    STORE(&s->start, (uintptr_t)addr);
    STORE(&s->seq, s->seq + 1u);
    return addr;
}

void ddp_map_release(void *addr, size_t len)
{
    for (size_t i = 0; i < DDP_MAP_SLOTS; i++) {
        struct ddp_map_slot *s = &slots[i];
        if (LOAD(&s->busy) && LOAD(&s->start) == (uintptr_t)addr) {
            /* Unpublish before unmapping: once unmapped, the address range may be
             * handed to another mapping that this slot must not claim. */
            STORE(&s->seq, s->seq + 1u);
            STORE(&s->start, (uintptr_t)0);
            STORE(&s->seq, s->seq + 1u);
            STORE(&s->busy, 0);
            break;
        }
    }
    munmap(addr, len);
}
