/* fastseq's worker threads for the chunked kernels of _cpu.pyx (one set of workers per
   process).

   fs_pool_run(team, ntask, fn, ctx) calls fn(NULL, ctx, k, tid) once for every chunk k in
   [0, ntask) on the calling thread (tid 0) and up to team - 1 workers (tid 1...), and returns
   when all are done. Chunks are claimed one at a time, so a worker the OS has descheduled never
   holds the others up: the caller takes the chunks nobody has claimed. Which thread runs a chunk
   never changes what the chunk computes.

   Why not an OpenMP parallel loop: GNU OpenMP's idle threads either spin (taking the core another
   process needs, a collapse on a busy machine) or sleep at once (then every region waits for a
   sleeping thread to be woken, tens of microseconds on a virtual machine, several times per
   training step). Idle workers here poll for FS_POOL_POLL_US with sched_yield(), which hands
   the core to any other runnable thread, then sleep on a condition variable. POSIX threads only; elsewhere (no
   pthreads) every chunk runs on the calling thread. */
#ifndef FS_POOL_H
#define FS_POOL_H

#include <stddef.h>
#include <stdint.h>

/* tag is always NULL: a typed first parameter lets a Cython fused function serve as a task */
typedef void (*fs_task)(void *tag, void *ctx, ptrdiff_t k, int tid);

#if defined(__unix__) || defined(__APPLE__)
#define FS_HAVE_POOL 1

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#define FS_POOL_MAX 63            /* workers at most (threads beyond the caller) */
#define FS_POOL_WRITING 0xffffffffu  /* chunk index while a job is being written */
/* How long a waiting thread polls (yielding its core to anyone runnable) before it sleeps: long
   enough to span the Python code between two kernel calls of a training step. */
#define FS_POOL_POLL_US 1000.0

static struct {
    pthread_mutex_t run;          /* one job at a time; a second caller runs its chunks alone */
    pthread_mutex_t lock;         /* with the condition variables, for sleeping */
    pthread_cond_t wake;          /* a new job (workers sleep on it) */
    pthread_cond_t finished;      /* the job's last chunk is done (the caller sleeps on it) */
    int workers;
    atomic_int job;               /* job number (bumped for every job) */
    atomic_int sleepers;          /* workers asleep on `wake` */
    atomic_uint_fast64_t claim;   /* job number << 32 | next unclaimed chunk */
    atomic_long done;             /* chunks of this job finished */
    atomic_int caller_asleep;
    /* the job: written while `claim` says FS_POOL_WRITING, read by workers seqlock-style */
    _Atomic(fs_task) fn;
    _Atomic(void *) ctx;
    atomic_long ntask;
    atomic_int helpers;           /* workers 1..helpers take part in this job */
    atomic_long helped;           /* chunks run by workers (a statistic for tests) */
} fs_pool = {.run = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
             .wake = PTHREAD_COND_INITIALIZER, .finished = PTHREAD_COND_INITIALIZER};

static double fs_pool_clock_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

/* Claim and run chunks of job `job` until none is left (or a newer job replaced it). */
static void fs_pool_chunks(uint32_t job, fs_task fn, void *ctx, ptrdiff_t ntask,
                           int tid)
{
    for (;;) {
        uint_fast64_t c = atomic_load(&fs_pool.claim);
        if ((uint32_t)(c >> 32) != job || (ptrdiff_t)(uint32_t)c >= ntask)
            return;
        if (!atomic_compare_exchange_weak(&fs_pool.claim, &c, c + 1))
            continue;
        fn(NULL, ctx, (ptrdiff_t)(uint32_t)c, tid);
        if (tid)
            atomic_fetch_add_explicit(&fs_pool.helped, 1, memory_order_relaxed);
        if (atomic_fetch_add(&fs_pool.done, 1) + 1 == ntask && atomic_load(&fs_pool.caller_asleep)) {
            pthread_mutex_lock(&fs_pool.lock);
            pthread_cond_signal(&fs_pool.finished);
            pthread_mutex_unlock(&fs_pool.lock);
        }
    }
}

static void *fs_pool_worker(void *arg)
{
    int tid = (int)(intptr_t)arg, seen = atomic_load(&fs_pool.job);
    for (;;) {
        double t0 = fs_pool_clock_us();
        while (atomic_load(&fs_pool.job) == seen) {
            if (fs_pool_clock_us() - t0 < FS_POOL_POLL_US) {
                sched_yield();
                continue;
            }
            pthread_mutex_lock(&fs_pool.lock);
            atomic_fetch_add(&fs_pool.sleepers, 1);
            while (atomic_load(&fs_pool.job) == seen)
                pthread_cond_wait(&fs_pool.wake, &fs_pool.lock);
            atomic_fetch_sub(&fs_pool.sleepers, 1);
            pthread_mutex_unlock(&fs_pool.lock);
        }
        seen = atomic_load(&fs_pool.job);
        for (;;) {  /* read the job: valid if no newer job began meanwhile */
            uint_fast64_t c = atomic_load(&fs_pool.claim);
            if ((uint32_t)c == FS_POOL_WRITING) {
                sched_yield();
                continue;
            }
            fs_task fn = atomic_load_explicit(&fs_pool.fn, memory_order_relaxed);
            void *ctx = atomic_load_explicit(&fs_pool.ctx, memory_order_relaxed);
            ptrdiff_t ntask = atomic_load_explicit(&fs_pool.ntask, memory_order_relaxed);
            int helpers = atomic_load_explicit(&fs_pool.helpers, memory_order_relaxed);
            atomic_thread_fence(memory_order_acquire);
            if ((atomic_load(&fs_pool.claim) >> 32) != (c >> 32))
                continue;
            if (tid <= helpers)
                fs_pool_chunks((uint32_t)(c >> 32), fn, ctx, ntask, tid);
            break;
        }
    }
    return NULL;
}

static void fs_pool_after_fork(void)
{
    /* the child has no workers: start afresh */
    pthread_mutex_init(&fs_pool.run, NULL);
    pthread_mutex_init(&fs_pool.lock, NULL);
    pthread_cond_init(&fs_pool.wake, NULL);
    pthread_cond_init(&fs_pool.finished, NULL);
    fs_pool.workers = 0;
    atomic_store(&fs_pool.sleepers, 0);
    atomic_store(&fs_pool.caller_asleep, 0);
}

static void fs_pool_serial(ptrdiff_t ntask, fs_task fn, void *ctx)
{
    for (ptrdiff_t k = 0; k < ntask; k++)
        fn(NULL, ctx, k, 0);
}

static void fs_pool_run(int team, ptrdiff_t ntask, fs_task fn, void *ctx)
{
    static int registered = 0;
    if (team > ntask)
        team = (int)ntask;
    if (team < 2 || pthread_mutex_trylock(&fs_pool.run) != 0) {
        fs_pool_serial(ntask, fn, ctx);
        return;
    }
    if (!registered)
        registered = pthread_atfork(NULL, NULL, fs_pool_after_fork) == 0;
    while (fs_pool.workers < team - 1 && fs_pool.workers < FS_POOL_MAX) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&t, &attr, fs_pool_worker, (void *)(intptr_t)(fs_pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (err != 0)
            break;
        fs_pool.workers++;
    }
    uint32_t job = (uint32_t)(atomic_load(&fs_pool.claim) >> 32) + 1;
    atomic_store(&fs_pool.claim, (uint_fast64_t)job << 32 | FS_POOL_WRITING);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&fs_pool.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&fs_pool.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&fs_pool.ntask, (long)ntask, memory_order_relaxed);
    atomic_store_explicit(&fs_pool.helpers, team - 1, memory_order_relaxed);
    atomic_store(&fs_pool.done, 0);
    atomic_store(&fs_pool.claim, (uint_fast64_t)job << 32);
    atomic_fetch_add(&fs_pool.job, 1);
    if (atomic_load(&fs_pool.sleepers) > 0) {
        pthread_mutex_lock(&fs_pool.lock);
        pthread_cond_broadcast(&fs_pool.wake);
        pthread_mutex_unlock(&fs_pool.lock);
    }
    fs_pool_chunks(job, fn, ctx, ntask, 0);
    /* the other chunks are running: poll, then sleep until the last one is done */
    double t0 = fs_pool_clock_us();
    while (atomic_load(&fs_pool.done) < ntask) {
        if (fs_pool_clock_us() - t0 < FS_POOL_POLL_US) {
            sched_yield();
            continue;
        }
        pthread_mutex_lock(&fs_pool.lock);
        atomic_store(&fs_pool.caller_asleep, 1);
        while (atomic_load(&fs_pool.done) < ntask)
            pthread_cond_wait(&fs_pool.finished, &fs_pool.lock);
        atomic_store(&fs_pool.caller_asleep, 0);
        pthread_mutex_unlock(&fs_pool.lock);
    }
    pthread_mutex_unlock(&fs_pool.run);
}

static long fs_pool_helped(void)
{
    return atomic_load(&fs_pool.helped);
}

#else
#define FS_HAVE_POOL 0
static long fs_pool_helped(void)
{
    return 0;
}
static void fs_pool_run(int team, ptrdiff_t ntask, fs_task fn, void *ctx)
{
    (void)team;
    for (ptrdiff_t k = 0; k < ntask; k++)
        fn(NULL, ctx, k, 0);
}
#endif

#endif
