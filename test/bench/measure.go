package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/test/loadgen/report"
	"github.com/kpr-dev/kpr/test/sandbox"
)

// Poller settings: a new connection every pollInterval, each given pollAttemptTimeout.
const (
	pollInterval       = 10 * time.Millisecond
	pollAttemptTimeout = 200 * time.Millisecond
	pollerStartTimeout = 15 * time.Second
)

// clientSpec is one loadgen client: whose path it measures, its cgroup and targets.
type clientSpec struct {
	path     Path
	cgroupFD int
	targets  []string
	workers  int // for the rate
}

// measure runs the three client measurements (connection rate, latency on new and on
// established connections) with path client's client in cgroupFD, and appends them to run as
// one sample.
func (b *bench) measure(ctx context.Context, client Path, cgroupFD int, targets []string, run *PathRun) error {
	s := &Sample{Client: client}
	run.Samples = append(run.Samples, s)
	return b.sampleSet(ctx, run, []clientSpec{{client, cgroupFD, targets, b.cfg.Workers}}, []*Sample{s})
}

// measurePair takes a sample of the run's own client and one of the direct client, one after
// the other (direct first when directFirst), and appends them to run as a pair.
func (b *bench) measurePair(ctx context.Context, own clientSpec, directFirst bool, run *PathRun) error {
	own.workers = b.cfg.Workers
	direct := clientSpec{Direct, b.plain.FD, b.podTargets(), b.cfg.Workers}
	p := &Pair{Path: &Sample{Client: own.path}, Direct: &Sample{Client: Direct}, DirectFirst: directFirst}
	run.Pairs = append(run.Pairs, p)
	order := []struct {
		c clientSpec
		s *Sample
	}{{own, p.Path}, {direct, p.Direct}}
	if directFirst {
		order[0], order[1] = order[1], order[0]
	}
	for _, o := range order {
		if err := b.sampleSet(ctx, run, []clientSpec{o.c}, []*Sample{o.s}); err != nil {
			return err
		}
	}
	return nil
}

// sampleSet takes the three measurements, each with the given clients running at once, into
// samples. A measurement during which other processes used more than OthersLimit of the
// machine's CPU is taken again (at most Retakes times, within DisturbanceBudget), after
// waiting for a quiet second.
func (b *bench) sampleSet(ctx context.Context, run *PathRun, clients []clientSpec, samples []*Sample) error {
	tracked := run.Path == KubeProxyNFTables || run.Path == KubeProxyIPTables
	rateTime := b.cfg.RateWarmup + b.cfg.RateDuration
	latTime := b.cfg.LatencyWarmup + b.cfg.LatencyDuration
	for _, m := range []struct {
		mode     string
		expected time.Duration
		args     func(c clientSpec) []string
		set      func(s *Sample, r *report.Run, others float64)
	}{
		{"rate", rateTime, func(c clientSpec) []string {
			return []string{"--workers", fmt.Sprint(c.workers), "--warmup", b.cfg.RateWarmup.String(), "--duration", b.cfg.RateDuration.String()}
		}, func(s *Sample, r *report.Run, o float64) { s.Rate, s.RateOthers = r, o }},
		{"fresh", latTime, func(clientSpec) []string {
			return []string{"--warmup", b.cfg.LatencyWarmup.String(), "--duration", b.cfg.LatencyDuration.String()}
		}, func(s *Sample, r *report.Run, o float64) { s.Fresh, s.FreshOthers = r, o }},
		{"established", latTime, func(clientSpec) []string {
			return []string{"--warmup", b.cfg.LatencyWarmup.String(), "--duration", b.cfg.LatencyDuration.String()}
		}, func(s *Sample, r *report.Run, o float64) { s.Established, s.EstablishedOthers = r, o }},
	} {
		for attempt := 0; ; attempt++ {
			if tracked {
				if err := b.flushConntrack(ctx); err != nil {
					return err
				}
			}
			b.waitQuiet(ctx)
			var bpfBefore map[string]ebpf.ProgramStats
			if m.mode == "rate" {
				bpfBefore = b.kprRunStats(clients)
			}
			before := b.cpu.snapshot()
			proxyBefore := procCPU(run.proxyPID)
			results := make([]*report.Run, len(clients))
			errs := make([]error, len(clients))
			var wg sync.WaitGroup
			for i, c := range clients {
				wg.Go(func() {
					// Random, as kube-proxy and kpr pick backends, so every path spreads the same way.
					args := append([]string{m.mode, "--targets", strings.Join(c.targets, ","), "--pick", "random",
						"--timeout", b.cfg.RequestTimeout.String()}, m.args(c)...)
					results[i], errs[i] = b.loadgenRun(ctx, c.cgroupFD, m.expected, b.clientCPUs, args...)
				})
			}
			wg.Wait()
			if err := errors.Join(errs...); err != nil {
				return err
			}
			after := b.cpu.snapshot()
			var bpfRun *BPFRun
			if bpfBefore != nil {
				bpfRun = b.kprRunDelta(bpfBefore)
			}
			others := othersShare(before, after)
			if tracked && m.mode == "rate" {
				run.ConntrackAfterRate = max(run.ConntrackAfterRate, b.conntrackCount(ctx))
			}
			if others > b.cfg.OthersLimit && attempt < b.cfg.Retakes && b.disturbedSpent < b.cfg.DisturbanceBudget {
				for i, c := range clients {
					run.Retaken = append(run.Retaken, Retake{Client: c.path, Mode: m.mode, Others: others, Result: results[i]})
				}
				b.disturbedSpent += after.at.Sub(before.at)
				b.disturbed = true
				continue
			}
			proxyUsed := 0.0
			if run.proxyPID > 0 {
				proxyUsed = max(0, procCPU(run.proxyPID)-proxyBefore)
			}
			for i, s := range samples {
				m.set(s, results[i], others)
				s.ProxyCPUSeconds += proxyUsed
				s.Seconds += after.at.Sub(before.at).Seconds()
				if m.mode == "rate" {
					s.RateBusySeconds = float64(after.busy-before.busy) / clkTck
					s.RateSpanSeconds = after.at.Sub(before.at).Seconds()
					s.RateBPF = bpfRun
				}
			}
			break
		}
	}
	return nil
}

// waitQuiet, after a disturbed measurement, waits (bounded per call, and together with the
// retakes by DisturbanceBudget over the whole run) for a second in which other processes leave
// the CPUs alone.
func (b *bench) waitQuiet(ctx context.Context) {
	if !b.disturbed {
		return
	}
	b.disturbed = false
	deadline := time.Now().Add(b.cfg.QuietWait)
	for time.Now().Before(deadline) && b.disturbedSpent < b.cfg.DisturbanceBudget {
		a := b.cpu.snapshot()
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
		b.disturbedSpent += time.Second
		if othersShare(a, b.cpu.snapshot()) <= b.cfg.OthersLimit {
			return
		}
	}
}

// loadgenRun runs one loadgen client in the client pod, on the CPUs in cpus (taskset syntax;
// empty for any), and reads its report. expected is how long the run itself takes; the
// command gets a minute more.
func (b *bench) loadgenRun(ctx context.Context, cgroupFD int, expected time.Duration, cpus string, args ...string) (*report.Run, error) {
	ctx, cancel := context.WithTimeout(ctx, expected+time.Minute)
	defer cancel()
	name, args := pinned(cpus, b.loadgen, args)
	out, err := b.client.Exec(ctx, cgroupFD, name, args...)
	if err != nil {
		return nil, fmt.Errorf("loadgen %s: %w", args[0], err)
	}
	return lastReport(out)
}

// pinned runs bin with args on cpus through taskset, or directly when cpus is empty.
func pinned(cpus, bin string, args []string) (string, []string) {
	if cpus == "" {
		return bin, args
	}
	return "taskset", append([]string{"-c", cpus, bin}, args...)
}

// lastReport parses the last JSON object line of loadgen's output.
func lastReport(out []byte) (*report.Run, error) {
	var last []byte
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64*1024), 4*1024*1024)
	for sc.Scan() {
		if line := bytes.TrimSpace(sc.Bytes()); len(line) > 0 && line[0] == '{' {
			last = append(last[:0], line...)
		}
	}
	if last == nil {
		return nil, fmt.Errorf("no report in loadgen output: %q", truncate(string(out), 500))
	}
	var r report.Run
	if err := json.Unmarshal(last, &r); err != nil {
		return nil, fmt.Errorf("loadgen report %q: %w", truncate(string(last), 500), err)
	}
	return &r, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// startPoller starts `loadgen first` against the ClusterIP in the client pod and waits until it
// polls, so the proxy can be started right after.
func (b *bench) startPoller(ctx context.Context, cgroupFD int, limit time.Duration) (*sandbox.Process, error) {
	p, err := b.client.StartCmd(ctx, sandbox.Cmd{Name: b.loadgen, CgroupFD: cgroupFD, Args: []string{
		"first", "--targets", b.svcTarget, "--timeout", limit.String(),
		"--interval", pollInterval.String(), "--attempt-timeout", pollAttemptTimeout.String(),
	}})
	if err != nil {
		return nil, fmt.Errorf("starting the poller: %w", err)
	}
	deadline := time.Now().Add(pollerStartTimeout)
	for {
		if data, _ := os.ReadFile(p.LogPath); bytes.Contains(data, []byte("polling\n")) {
			return p, nil
		}
		if p.Exited() {
			return nil, fmt.Errorf("poller exited before polling: %s", p.LogTail(2000))
		}
		if time.Now().After(deadline) {
			_ = p.Kill()
			return nil, fmt.Errorf("poller not polling after %s", pollerStartTimeout)
		}
		select {
		case <-ctx.Done():
			_ = p.Kill()
			return nil, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// waitFirstAnswer waits for the poller's report and records the time from started to the
// first answer.
func (b *bench) waitFirstAnswer(ctx context.Context, poller *sandbox.Process, started time.Time, limit time.Duration, run *PathRun) error {
	run.HasFirstAnswer = true
	run.FirstAnswerLimit = limit
	select {
	case <-poller.Done():
	case <-time.After(limit + 30*time.Second):
		_ = poller.Kill()
		return fmt.Errorf("the poller did not finish within %s", limit+30*time.Second)
	case <-ctx.Done():
		_ = poller.Kill()
		return ctx.Err()
	}
	data, err := os.ReadFile(poller.LogPath)
	if err != nil {
		return err
	}
	r, err := lastReport(data)
	if err != nil {
		return fmt.Errorf("poller: %w", err)
	}
	run.FirstAttempts = r.Attempts
	if r.FirstOKUnixNano == 0 {
		run.Answered = false
		return nil
	}
	run.Answered = true
	run.FirstAnswer = time.Unix(0, r.FirstOKUnixNano).Sub(started)
	return nil
}

// procCPU is the CPU time (user and system, seconds) process pid has used, or 0.
func procCPU(pid int) float64 {
	if pid <= 0 {
		return 0
	}
	f := procStat(pid)
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / clkTck
}

// conntrackCount is the node's conntrack table size, or -1.
func (b *bench) conntrackCount(ctx context.Context) int64 {
	out, err := b.nodeCmd(ctx, "cat", "/proc/sys/net/netfilter/nf_conntrack_count")
	if err != nil {
		return -1
	}
	n, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if err != nil {
		return -1
	}
	return n
}

// Mem is a process's resident memory from /proc/<pid>/status, in bytes.
type Mem struct {
	RSS int64 `json:"vm_rss"`
	HWM int64 `json:"vm_hwm"`
}

func readMem(pid int) Mem {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Mem{}
	}
	m, _ := parseStatus(data)
	return m
}

func parseStatus(data []byte) (Mem, error) {
	var m Mem
	for _, line := range strings.Split(string(data), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok || (key != "VmRSS" && key != "VmHWM") {
			continue
		}
		f := strings.Fields(val)
		if len(f) != 2 || f[1] != "kB" {
			return m, fmt.Errorf("%s: unexpected %q", key, val)
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return m, err
		}
		if key == "VmRSS" {
			m.RSS = kb * 1024
		} else {
			m.HWM = kb * 1024
		}
	}
	if m.RSS == 0 {
		return m, errors.New("no VmRSS")
	}
	return m, nil
}

// kprRunStats reads the run-time statistics of kpr's programs before a measurement in which
// kpr's client runs alone; nil when the statistics are off or the clients are others'.
func (b *bench) kprRunStats(clients []clientSpec) map[string]ebpf.ProgramStats {
	if b.bpfStats == nil || len(clients) != 1 || !clients[0].path.isKpr() {
		return nil
	}
	st, err := bpf.RunStats(b.kpr.PinDir)
	if err != nil {
		b.log("BPF run-time statistics: %v", err)
		return nil
	}
	return st
}

// kprRunDelta is what kpr's programs did since before.
func (b *bench) kprRunDelta(before map[string]ebpf.ProgramStats) *BPFRun {
	after, err := bpf.RunStats(b.kpr.PinDir)
	if err != nil {
		b.log("BPF run-time statistics: %v", err)
		return nil
	}
	out := &BPFRun{ByProgram: map[string][2]uint64{}}
	for name, a := range after {
		p, ok := before[name]
		if !ok || a.RunCount < p.RunCount || a.Runtime < p.Runtime {
			continue // reloaded in between: not comparable
		}
		runs, nanos := a.RunCount-p.RunCount, uint64(a.Runtime-p.Runtime)
		out.Runs += runs
		out.Nanos += nanos
		if runs > 0 {
			out.ByProgram[name] = [2]uint64{runs, nanos}
		}
	}
	return out
}
