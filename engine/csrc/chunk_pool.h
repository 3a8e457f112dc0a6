// csrc/chunk_pool.c: a parallel loop whose caller never waits for a helper that the OS took off its core.
#include <stddef.h>

#define CHUNK_JOB_BYTES 128       // the most a loop's arguments (`job`) may take: they are copied into the pool
#define CHUNK_SCRATCH_FLOATS 2048  // the most one chunk's result may take before it is delivered

// Chunk `i` of the loop whose arguments are `job`, computed into `scratch`: floats [i * per_chunk, up to
// i * per_chunk + per_chunk or `total`) of the loop's output.
typedef void (*chunk_fn)(const void *job, int i, float *scratch);

// out[0, total) in chunks of `per_chunk` floats (at most CHUNK_SCRATCH_FLOATS): compute(job, i, scratch) for
// every chunk, each copied into `out` once; returns 0 when all are, 1 for bad arguments. Spread over the calling
// thread's pool.
int chunk_loop(float *out, size_t total, size_t per_chunk, chunk_fn compute, const void *job, size_t job_bytes);

// Start the calling thread's pool with `helpers` threads, at idle priority (SCHED_IDLE) when `idle`; they
// share the caller's CPU affinity. Returns the number of helpers (a pool already started stays as it is).
int chunk_pool_start(int helpers, int idle);

// Start the calling thread's OpenMP team (omp_get_max_threads()), name its workers (not the caller)
// "engine-omp", and put them under SCHED_IDLE when `idle`. Later parallel regions of the caller reuse them.
void openmp_workers_start(int idle);
