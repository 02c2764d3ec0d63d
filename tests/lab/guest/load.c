/*
 * lab-load: the CPU load of a lab guest, driven by the kernel command line.
 *
 *   work=N          loop iterations per millisecond of vCPU time, calibrated once per host
 *   load=N          percent of one pCPU per vCPU (0-100)
 *   pattern=L:S,... phases of load L for S seconds, cycling
 *   period=MS       length of one work period (default 100)
 *   calibrate=R     instead of a load, R timed bursts that the host measures
 *
 * Every second each vCPU process reports the iterations it has done so far (LAB-WORK). The
 * host reads the vCPU's time as each report arrives, and so knows the speed the loop ran at
 * between two reports: on a cloud VM that drifts from the calibration's within seconds.
 *
 * The load is work-based: each period does a fixed number of iterations and sleeps only for
 * what is left of the period. Guests that share a pCPU therefore add up until the pCPU
 * saturates, the way real workloads do; a time-based duty cycle would stretch its busy phase
 * under contention and hide imbalance.
 *
 * Each period's length is drawn at random around `period` (half to one and a half times it),
 * with the work scaled to match. Fixed periods would lock the phases of guests that share a
 * pCPU: how long they wait for each other would then depend on which two happen to be paired,
 * not on their loads, the way no real workload behaves.
 *
 * One process per guest vCPU, each bound to its vCPU, so every vCPU carries the load.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_PHASES 32
#define CHUNK 4096u
#define REPORT_SECS 1.0

struct phase {
	int load;
	double secs;
};

static struct phase phases[MAX_PHASES];
static int nphases;
static double work_per_ms;
static int period_ms = 100;
static int calibrate_rounds;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_for(double secs)
{
	struct timespec ts;
	if (secs <= 0)
		return;
	ts.tv_sec = (time_t)secs;
	ts.tv_nsec = (long)((secs - (double)ts.tv_sec) * 1e9);
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

/*
 * The unit of work. The empty asm keeps the compiler from folding the loop away; noinline
 * makes calibration and load run the very same machine code, so the calibrated speed holds.
 */
static __attribute__((noinline)) void spin(uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		__asm__ volatile("" ::: "memory");
}

/* xorshift64*: plenty for spreading period lengths, and no libc state shared across forks. */
static uint64_t rng_state;

static double uniform(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (double)((rng_state * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static void seed(int vcpu)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	rng_state = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)vcpu << 56) ^
		    0x9e3779b97f4a7c15ULL;
	for (int i = 0; i < 8; i++)
		uniform();
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	/* One write per line, so lines from several vCPU processes never interleave. */
	printf("%s uptime=%.3f\n", buf, now());
	fflush(stdout);
}

static int parse_pattern(const char *spec)
{
	const char *p = spec;
	while (*p && nphases < MAX_PHASES) {
		char *end;
		long load = strtol(p, &end, 10);
		if (*end != ':')
			return -1;
		double secs = strtod(end + 1, &end);
		if (load < 0 || load > 100 || secs <= 0)
			return -1;
		phases[nphases].load = (int)load;
		phases[nphases].secs = secs;
		nphases++;
		if (*end == ',')
			end++;
		else if (*end != '\0')
			return -1;
		p = end;
	}
	return nphases > 0 ? 0 : -1;
}

static void parse_cmdline(void)
{
	static char buf[4096];
	FILE *f = fopen("/proc/cmdline", "r");
	if (!f || !fgets(buf, sizeof(buf), f)) {
		say("LAB-ERROR cannot read /proc/cmdline");
		exit(1);
	}
	fclose(f);
	int load = -1;
	for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n")) {
		if (strncmp(tok, "load=", 5) == 0)
			load = atoi(tok + 5);
		else if (strncmp(tok, "work=", 5) == 0)
			work_per_ms = strtod(tok + 5, NULL);
		else if (strncmp(tok, "period=", 7) == 0)
			period_ms = atoi(tok + 7);
		else if (strncmp(tok, "calibrate=", 10) == 0)
			calibrate_rounds = atoi(tok + 10);
		else if (strncmp(tok, "pattern=", 8) == 0 && parse_pattern(tok + 8) != 0) {
			say("LAB-ERROR bad pattern %s", tok + 8);
			exit(1);
		}
	}
	if (nphases == 0) {
		if (load < 0 || load > 100)
			load = 0;
		phases[0].load = load;
		phases[0].secs = 1e9;
		nphases = 1;
	}
	if (period_ms < 10)
		period_ms = 10;
}

/* Bursts of about `secs` each; the host reads the vCPU time between BEGIN and END lines. */
static void calibrate(void)
{
	for (int r = 0; r < calibrate_rounds; r++) {
		sleep_for(0.5);
		say("LAB-CAL-BEGIN round=%d", r);
		uint64_t iters = 0;
		double end = now() + 2.5;
		while (now() < end) {
			spin(CHUNK * 16);
			iters += CHUNK * 16;
		}
		say("LAB-CAL-END round=%d iters=%llu", r, (unsigned long long)iters);
	}
	say("LAB-CAL-DONE");
	for (;;)
		pause();
}

static void run_load(int vcpu)
{
	double start = now();
	double next = start;
	double report_at = start + REPORT_SECS;
	uint64_t done = 0;
	int k = 0;
	double phase_end = start + phases[0].secs;
	seed(vcpu);
	if (vcpu == 0)
		say("LAB-PHASE n=0 load=%d", phases[0].load);
	for (;;) {
		double t = now();
		if (t >= report_at) {
			say("LAB-WORK vcpu=%d iters=%llu", vcpu, (unsigned long long)done);
			report_at += REPORT_SECS;
			if (report_at < t)
				report_at = t + REPORT_SECS;
		}
		while (t >= phase_end) {
			k = (k + 1) % nphases;
			phase_end += phases[k].secs;
			if (vcpu == 0)
				say("LAB-PHASE n=%d load=%d", k, phases[k].load);
		}
		int load = phases[k].load;
		if (load >= 100) {
			/* No sleep at all: a full vCPU must not lose the calibration error each period. */
			spin(CHUNK * 64);
			done += CHUNK * 64;
			next = now();
			continue;
		}
		double period_ms_now = period_ms * (0.5 + uniform());
		next += period_ms_now / 1000.0;
		if (load > 0) {
			uint64_t n = (uint64_t)(work_per_ms * period_ms_now * load / 100.0);
			spin(n);
			done += n;
		}
		t = now();
		if (next > t)
			sleep_for(next - t);
		else
			next = t; /* behind: start the next period now, carrying no debt */
	}
}

int main(void)
{
	mount("proc", "/proc", "proc", 0, NULL);
	parse_cmdline();
	cpu_set_t set;
	CPU_ZERO(&set);
	sched_getaffinity(0, sizeof(set), &set);
	int nvcpus = CPU_COUNT(&set);
	if (calibrate_rounds > 0) {
		say("LAB-READY mode=calibrate vcpus=%d", nvcpus);
		calibrate();
	}
	if (work_per_ms <= 0) {
		say("LAB-ERROR work= missing on the kernel command line");
		for (;;)
			pause();
	}
	int vcpu = 0;
	for (int i = 1; i < nvcpus; i++) {
		pid_t pid = fork();
		if (pid == 0) {
			vcpu = i;
			break;
		}
	}
	CPU_ZERO(&set);
	CPU_SET(vcpu, &set);
	sched_setaffinity(0, sizeof(set), &set);
	if (vcpu == 0)
		say("LAB-READY mode=load vcpus=%d phases=%d period=%d work=%.1f", nvcpus, nphases,
		    period_ms, work_per_ms);
	run_load(vcpu);
	return 0;
}
