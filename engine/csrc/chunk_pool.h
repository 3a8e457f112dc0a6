// csrc/chunk_pool.c: a parallel loop whose caller never waits for a helper that the OS took off its core.
#include <stddef.h>

#define CHUNK_JOB_BYTES 128       // the most a loop's arguments (`job`) may take: they are copied into the pool
#define CHUNK_SCRATCH_BYTES 8192  // the most one chunk's result may take before it is delivered

// Chunk `i` of the loop whose arguments are `job`: computed into `scratch`, or delivered from there.
typedef void (*chunk_fn)(const void *job, int i, void *scratch);

// For every i < chunks, compute(job, i, scratch) and then deliver(job, i, scratch) on the same thread, each
// chunk delivered once; returns when all are. Spread over the calling thread's pool.
void chunk_loop(int chunks, chunk_fn compute, chunk_fn deliver, const void *job, size_t job_bytes);

// Start the calling thread's pool with `helpers` threads, at idle priority (SCHED_IDLE) when `idle`; they
// share the caller's CPU affinity. Returns the number of helpers (a pool already started stays as it is).
int chunk_pool_start(int helpers, int idle);

// Start the calling thread's OpenMP team (omp_get_max_threads()), name its workers (not the caller)
// "engine-omp", and put them under SCHED_IDLE when `idle`. Later parallel regions of the caller reuse them.
void openmp_workers_start(int idle);
