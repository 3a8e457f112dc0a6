// A parallel loop for the one-row decode kernels whose caller never waits for a helper the OS took off its core.
//
// An OpenMP team ends every parallel region at a barrier that waits for all of its threads. When the engine
// computes on every core, each process of the serving stack that wakes (Triton, the adapter, a client) takes a
// core from one of them, and the whole step stands still until it gives the core back: each millisecond of
// their CPU cost a one-stream step about a millisecond. Here the caller takes chunks too, and at the end it
// computes any chunk that a helper took but has not delivered within about two chunks' time, instead of
// waiting for it. Whoever finishes a chunk first delivers it (a compare-and-swap on its state); the other
// copy is dropped. A helper that was preempted then costs the caller its share of the work, not the time it
// was away; with the helpers at idle priority (chunk_pool_start) the stack's processes take their cores, not
// the caller's.
//
// Each chunk is computed into a scratch buffer and copied into place when delivered, so a late helper never
// writes into a loop that has ended. It may still read the inputs of a loop that has ended (its result is then
// dropped): loops may only read memory that stays mapped, as weights, the caller's work buffers and small heap
// blocks do.
//
// One pool per calling thread, started by chunk_pool_start or else at its first loop with
// omp_get_max_threads() - 1 helpers; they stop when the calling thread ends.
#define _GNU_SOURCE
#include "chunk_pool.h"

#include <immintrin.h>
#include <linux/futex.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_CHUNKS 4096
#define MAX_HELPERS 63
#define SPIN_NS 300000  // how long a helper waits for the next loop before it sleeps (a step's gaps are us)

enum { FREE = 0, DELIVERING = 1, DONE = 2 };  // a chunk's state, under its loop's number (state = number << 2 | s)

typedef struct {  // one chunk_loop
    chunk_fn compute;
    float *out;
    size_t total, per_chunk;
    int chunks;
    unsigned char job[CHUNK_JOB_BYTES];
} Loop;

typedef struct {
    _Atomic uint64_t seq;     // 2 * the loop's number once it is published; odd while the next one is written
    _Atomic uint64_t cursor;  // the loop's number << 32 | the next chunk to take
    _Atomic uint32_t state[MAX_CHUNKS];
    _Atomic int sleepers, stop;
    // the loop, valid while seq is even (helpers copy it, then check seq again)
    Loop loop;
    int helpers, idle;
    pthread_t threads[MAX_HELPERS];
} Pool;

static __thread Pool *thread_pool;
static pthread_key_t pool_key;
static pthread_once_t pool_key_once = PTHREAD_ONCE_INIT;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + t.tv_nsec;
}

// Futexes on seq's low 32 bits (little-endian): enough to tell one loop from the next.
static void sleep_while(_Atomic uint64_t *word, uint64_t value) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, (uint32_t)value, NULL, NULL, 0);
}

static void wake_all(_Atomic uint64_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, MAX_HELPERS, NULL, NULL, 0);
}

// The next chunk of loop `number`, or -1 when it has none left (or another loop runs now).
static int take(Pool *p, uint64_t number, int chunks) {
    uint64_t c = atomic_load_explicit(&p->cursor, memory_order_acquire);
    for (;;) {
        if (c >> 32 != (number & 0xffffffffu) || (int)(c & 0xffffffffu) >= chunks) return -1;
        if (atomic_compare_exchange_weak_explicit(&p->cursor, &c, c + 1, memory_order_acq_rel, memory_order_acquire))
            return (int)(c & 0xffffffffu);
    }
}

// Copy chunk `i` from `scratch` into the loop's output.
static void copy_out(const Loop *loop, int i, const float *scratch) {
    const size_t first = (size_t)i * loop->per_chunk;
    const size_t count = loop->total - first < loop->per_chunk ? loop->total - first : loop->per_chunk;
    memcpy(loop->out + first, scratch, sizeof(float) * count);
}

// Compute chunk `i` of loop `number` and deliver it unless someone else did first.
static void run_chunk(Pool *p, uint64_t number, const Loop *loop, int i, float *scratch) {
    loop->compute(loop->job, i, scratch);
    const uint32_t tag = (uint32_t)(number << 2);
    uint32_t expected = tag | FREE;
    if (!atomic_compare_exchange_strong_explicit(&p->state[i], &expected, tag | DELIVERING, memory_order_acq_rel,
                                                 memory_order_relaxed))
        return;
    copy_out(loop, i, scratch);
    atomic_store_explicit(&p->state[i], tag | DONE, memory_order_release);
}

static void *helper(void *arg) {
    Pool *p = arg;
    pthread_setname_np(pthread_self(), "chunk-pool");
    if (p->idle) {
        const struct sched_param none = {0};
        sched_setscheduler(0, SCHED_IDLE, &none);  // 0: this thread
    }
    Loop loop;
    float scratch[CHUNK_SCRATCH_FLOATS] __attribute__((aligned(64)));
    uint64_t last = 0;  // the last loop this helper took part in
    while (!atomic_load_explicit(&p->stop, memory_order_relaxed)) {
        uint64_t seq = atomic_load_explicit(&p->seq, memory_order_acquire);
        if (seq & 1 || seq / 2 == last) {  // no new loop yet: spin a while, then sleep
            const uint64_t since = now_ns();
            for (int n = 1; (seq = atomic_load_explicit(&p->seq, memory_order_acquire)) == 2 * last; n++) {
                _mm_pause();
                if (!(n & 63) && now_ns() - since > SPIN_NS) {
                    atomic_fetch_add(&p->sleepers, 1);
                    sleep_while(&p->seq, seq);
                    atomic_fetch_sub(&p->sleepers, 1);
                    break;
                }
            }
            continue;
        }
        memcpy(&loop, &p->loop, sizeof loop);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&p->seq, memory_order_relaxed) != seq) continue;  // rewritten meanwhile
        last = seq / 2;
        for (int i; (i = take(p, last, loop.chunks)) >= 0;) run_chunk(p, last, &loop, i, scratch);
    }
    return NULL;
}

// When the thread that owns `arg` ends: stop its helpers.
static void close_pool(void *arg) {
    Pool *p = arg;
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->seq, 2);
    wake_all(&p->seq);
    for (int t = 0; t < p->helpers; t++) pthread_join(p->threads[t], NULL);
    free(p);
}

static void make_key(void) { pthread_key_create(&pool_key, close_pool); }

static Pool *start(int helpers, int idle) {
    if (thread_pool) return thread_pool;
    Pool *p = aligned_alloc(64, (sizeof(Pool) + 63) / 64 * 64);
    if (!p) return NULL;
    memset(p, 0, sizeof(Pool));
    p->idle = idle;
    helpers = helpers < 0 ? 0 : helpers > MAX_HELPERS ? MAX_HELPERS : helpers;
    while (p->helpers < helpers && pthread_create(&p->threads[p->helpers], NULL, helper, p) == 0) p->helpers++;
    pthread_once(&pool_key_once, make_key);
    pthread_setspecific(pool_key, p);
    return thread_pool = p;
}

int chunk_pool_start(int helpers, int idle) {
    const Pool *p = start(helpers, idle);
    return p ? p->helpers : 0;
}

int chunk_loop(float *out, size_t total, size_t per_chunk, chunk_fn compute, const void *job, size_t job_bytes) {
    if (per_chunk < 1 || per_chunk > CHUNK_SCRATCH_FLOATS || job_bytes > CHUNK_JOB_BYTES) return 1;
    float scratch[CHUNK_SCRATCH_FLOATS] __attribute__((aligned(64)));
    const size_t count = (total + per_chunk - 1) / per_chunk;
    Loop args = {compute, out, total, per_chunk, (int)count};
    memcpy(args.job, job, job_bytes);
    Pool *p = start(omp_get_max_threads() - 1, 0);
    if (!p || !p->helpers || count < 2 || count > MAX_CHUNKS) {
        for (size_t i = 0; i < count; i++) {
            compute(job, (int)i, scratch);
            copy_out(&args, (int)i, scratch);
        }
        return 0;
    }
    const int chunks = (int)count;
    // Publish the loop (a seqlock: helpers that copy it while it is written see seq change and copy again).
    const uint64_t number = atomic_load_explicit(&p->seq, memory_order_relaxed) / 2 + 1;
    atomic_store_explicit(&p->seq, 2 * number - 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    p->loop = args;
    const uint32_t tag = (uint32_t)(number << 2);
    for (int i = 0; i < chunks; i++) atomic_store_explicit(&p->state[i], tag | FREE, memory_order_relaxed);
    atomic_store_explicit(&p->cursor, (number & 0xffffffffu) << 32, memory_order_relaxed);
    atomic_store_explicit(&p->seq, 2 * number, memory_order_release);
    if (atomic_load(&p->sleepers)) wake_all(&p->seq);

    const Loop *loop = &args;
    const uint64_t started = now_ns();
    int mine = 0;
    for (int i; (i = take(p, number, chunks)) >= 0; mine++) run_chunk(p, number, loop, i, scratch);
    // The chunks helpers took and have not delivered: a helper on its core is about done with its chunk, so
    // wait about two chunks' time, then compute the rest here too.
    const uint64_t patience = mine ? 2 * (now_ns() - started) / mine : 0, waiting = now_ns();
    for (int i = 0; i < chunks; i++) {
        uint32_t s;
        while ((s = atomic_load_explicit(&p->state[i], memory_order_acquire)) != (tag | DONE)) {
            if (s == (tag | FREE) && now_ns() - waiting > patience)
                run_chunk(p, number, loop, i, scratch);
            else
                _mm_pause();  // the helper is about done, or copying its result into place
        }
    }
    return 0;
}

void openmp_workers_start(int idle) {
    const struct sched_param none = {0};
#pragma omp parallel
    if (omp_get_thread_num()) {
        pthread_setname_np(pthread_self(), "engine-omp");
        if (idle) sched_setscheduler(0, SCHED_IDLE, &none);
    }
}
