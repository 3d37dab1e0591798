/* The process's one turn at nvJPEG's batched decode call, taken and given up in native code.
 *
 * With a Python lock around a ctypes call, the thread back from the call first waits for the GIL
 * (up to one switch interval while another thread runs Python) and only then releases the lock,
 * and the next thread waits for the GIL again before it can make its call: the JPEG engines idle
 * through both waits. Here the turn is a pthread mutex taken, used and given up inside one ctypes
 * call, which runs without the GIL, so the next thread, waiting in the same call, goes on at once.
 * Built and loaded by engine_turn.py. */
#include <pthread.h>
#include <time.h>

typedef int (*call6)(void *, void *, void *, void *, void *, void *);

static pthread_mutex_t turn = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* fn(a0..a5) with the turn held; seconds[0] += the wait for the turn, seconds[1] += the call. */
int engine_turn_call6(call6 fn, void *a0, void *a1, void *a2, void *a3, void *a4, void *a5,
                      double *seconds) {
    double t0 = now();
    pthread_mutex_lock(&turn);
    double t1 = now();
    int status = fn(a0, a1, a2, a3, a4, a5);
    double t2 = now();
    pthread_mutex_unlock(&turn);
    seconds[0] += t1 - t0;
    seconds[1] += t2 - t1;
    return status;
}

/* For the rare calls that must not overlap the decode either (setting a state up). */
void engine_turn_take(void) { pthread_mutex_lock(&turn); }
void engine_turn_give(void) { pthread_mutex_unlock(&turn); }
