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
	return b.sampleSet(ctx, run, clientSpec{client, cgroupFD, targets, b.cfg.Workers}, s)
}

// measurePair measures the run's own client against the direct client interleaved: for each
// of the three measurements both clients run at once, gated (loadgen --gate), and take turns in
// slices of cfg.Slice, the order alternating from one couple of slices to the next (own,
// direct, direct, own, ... or the reverse when directFirst), for the warm-up and then for the
// measured time. A slow change of the machine's speed (other guests, frequency, the proxy's
// periodic work) then weighs on both sides alike, which samples taken one after the other,
// seconds apart, cannot promise. The caller files the pair; with an error it holds what was
// measured before.
func (b *bench) measurePair(ctx context.Context, own clientSpec, directFirst bool, run *PathRun) (*Pair, error) {
	own.workers = b.cfg.Workers
	direct := clientSpec{Direct, b.plain.FD, b.podTargets(), b.cfg.Workers}
	p := &Pair{Path: &Sample{Client: own.path}, Direct: &Sample{Client: Direct}, DirectFirst: directFirst,
		SliceSeconds: b.cfg.Slice.Seconds()}
	clients := [2]clientSpec{own, direct}
	samples := [2]*Sample{p.Path, p.Direct}
	first := 0
	if directFirst {
		first = 1
	}
	for _, m := range b.modes() {
		for attempt := 0; ; attempt++ {
			b.waitQuiet(ctx)
			res, err := b.interleave(ctx, run, m, clients, first)
			if err != nil {
				return p, err
			}
			if res.others > b.cfg.OthersLimit && attempt < b.cfg.Retakes && b.disturbedSpent < b.cfg.DisturbanceBudget {
				for i, c := range clients {
					run.Retaken = append(run.Retaken, Retake{Client: c.path, Mode: m.mode, Others: res.others, Result: res.side[i].result})
				}
				b.disturbedSpent += res.span
				b.disturbed = true
				continue
			}
			for i, s := range samples {
				side := res.side[i]
				m.set(s, side.result, res.others)
				s.ProxyCPUSeconds += side.proxyCPU
				s.Seconds += side.span.Seconds()
				if m.mode == "rate" {
					s.RateBusySeconds = float64(side.busy) / clkTck
					s.RateSpanSeconds = side.span.Seconds()
					s.RateBPF = side.bpf
				}
			}
			break
		}
	}
	return p, nil
}

// mode is one of the three client measurements.
type mode struct {
	mode         string
	warm, length time.Duration
	args         func(c clientSpec) []string // beyond --targets, --pick, --timeout
	set          func(s *Sample, r *report.Run, others float64)
}

// modes are the connection rate and the latency on new and on established connections.
func (b *bench) modes() []mode {
	return []mode{
		{"rate", b.cfg.RateWarmup, b.cfg.RateDuration, func(c clientSpec) []string {
			return []string{"--workers", fmt.Sprint(c.workers), "--warmup", b.cfg.RateWarmup.String(), "--duration", b.cfg.RateDuration.String()}
		}, func(s *Sample, r *report.Run, o float64) { s.Rate, s.RateOthers = r, o }},
		{"fresh", b.cfg.LatencyWarmup, b.cfg.LatencyDuration, func(clientSpec) []string {
			return []string{"--warmup", b.cfg.LatencyWarmup.String(), "--duration", b.cfg.LatencyDuration.String()}
		}, func(s *Sample, r *report.Run, o float64) { s.Fresh, s.FreshOthers = r, o }},
		{"established", b.cfg.LatencyWarmup, b.cfg.LatencyDuration, func(clientSpec) []string {
			return []string{"--warmup", b.cfg.LatencyWarmup.String(), "--duration", b.cfg.LatencyDuration.String()}
		}, func(s *Sample, r *report.Run, o float64) { s.Established, s.EstablishedOthers = r, o }},
	}
}

// clientArgs is loadgen's command line for client c in measurement m.
func (b *bench) clientArgs(m mode, c clientSpec) []string {
	// Random, as kube-proxy and kpr pick backends, so every path spreads the same way.
	return append([]string{m.mode, "--targets", strings.Join(c.targets, ","), "--pick", "random",
		"--timeout", b.cfg.RequestTimeout.String()}, m.args(c)...)
}

// sideResult is one client's part of an interleaved measurement.
type sideResult struct {
	result   *report.Run
	busy     uint64        // ticks the machine worked during this side's measured slices
	span     time.Duration // those slices' time, as this process timed them
	proxyCPU float64       // seconds the proxy process used during them
	bpf      *BPFRun       // what kpr's programs did during them (kpr runs, statistics on)
}

// interleaved is an interleaved measurement of two clients.
type interleaved struct {
	side   [2]sideResult
	others float64       // share of the CPUs others took over the whole measurement
	span   time.Duration // its whole time
}

// mark is what an interleaved measurement reads at each boundary between slices.
type mark struct {
	at    time.Time
	busy  uint64                       // ticks all CPUs worked (busyNow)
	proxy float64                      // CPU seconds the proxy process used
	bpf   map[string]ebpf.ProgramStats // kpr's programs, when withBPF
}

func (b *bench) markNow(proxyPID int, withBPF bool) mark {
	var m mark
	if withBPF {
		m.bpf = b.kprRunStats()
	}
	m.at, m.busy, _ = busyNow()
	m.proxy = procCPU(proxyPID)
	return m
}

// interleave runs measurement m with both clients gated, client first taking the first slice.
func (b *bench) interleave(ctx context.Context, run *PathRun, m mode, clients [2]clientSpec, first int) (*interleaved, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*(m.warm+m.length)+2*time.Minute)
	defer cancel()
	var procs [2]*sandbox.Process
	var gates [2]*os.File
	defer func() {
		for i := range 2 {
			if gates[i] != nil {
				gates[i].Close()
			}
			if procs[i] != nil {
				_ = procs[i].Kill()
			}
		}
	}()
	for i, c := range clients {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		name, args := pinned(b.clientCPUs, b.loadgen, append(b.clientArgs(m, c), "--gate"))
		procs[i], err = b.client.StartCmd(ctx, sandbox.Cmd{Name: name, Args: args, CgroupFD: c.cgroupFD, Stdin: r})
		r.Close()
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("loadgen %s: %w", m.mode, err)
		}
		gates[i] = w
	}
	say := func(i int, cmd string) error {
		if _, err := fmt.Fprintln(gates[i], cmd); err != nil {
			return fmt.Errorf("loadgen %s (%s): %w: %s", m.mode, clients[i].path, err, procs[i].LogTail(500))
		}
		return nil
	}
	slice := func(i int, cmd string) error {
		if err := say(i, cmd); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(b.cfg.Slice):
		}
		return say(i, "pause")
	}
	turns := func(d time.Duration) int { return int((d + b.cfg.Slice - 1) / b.cfg.Slice) }
	for range turns(m.warm) {
		for _, i := range []int{first, 1 - first} {
			if err := slice(i, "warm"); err != nil {
				return nil, err
			}
		}
	}
	// kpr's programs, read around every measured slice: the socket programs run for kpr's
	// client only, the tc programs on the pods' devices for both clients' packets.
	withBPF := m.mode == "rate" && clients[0].path.isKpr() && b.bpfStats != nil
	res := &interleaved{}
	before := b.cpu.snapshot()
	// The slices run back to back, so what is read after one slice is read before the next.
	prev := b.markNow(run.proxyPID, withBPF)
	for k := range turns(m.length) {
		order := []int{first, 1 - first}
		if k%2 == 1 {
			order[0], order[1] = order[1], order[0]
		}
		for _, i := range order {
			if err := slice(i, "run"); err != nil {
				return nil, err
			}
			cur := b.markNow(run.proxyPID, withBPF)
			s := &res.side[i]
			s.span += cur.at.Sub(prev.at)
			if cur.busy > prev.busy {
				s.busy += cur.busy - prev.busy
			}
			s.proxyCPU += max(0, cur.proxy-prev.proxy)
			if withBPF {
				s.bpf = s.bpf.add(bpfDelta(prev.bpf, cur.bpf))
			}
			prev = cur
		}
	}
	after := b.cpu.snapshot()
	res.others = othersShare(before, after)
	res.span = after.at.Sub(before.at)
	for i := range 2 {
		gates[i].Close()
		gates[i] = nil
	}
	for i, p := range procs {
		select {
		case <-p.Done():
		case <-ctx.Done():
			return nil, fmt.Errorf("loadgen %s (%s) did not end with its input: %w", m.mode, clients[i].path, ctx.Err())
		}
		data, err := os.ReadFile(p.LogPath)
		if err != nil {
			return nil, err
		}
		if res.side[i].result, err = lastReport(data); err != nil {
			return nil, fmt.Errorf("loadgen %s (%s): %w", m.mode, clients[i].path, err)
		}
		if err := p.Wait(); err != nil {
			return nil, fmt.Errorf("loadgen %s (%s): %w: %s", m.mode, clients[i].path, err, p.LogTail(500))
		}
	}
	return res, nil
}

// sampleSet takes the three measurements of client c into s. A measurement during which other
// processes used more than OthersLimit of the machine's CPU is taken again (at most Retakes
// times, within DisturbanceBudget), after waiting for a quiet second.
func (b *bench) sampleSet(ctx context.Context, run *PathRun, c clientSpec, s *Sample) error {
	tracked := run.Path == KubeProxyNFTables || run.Path == KubeProxyIPTables
	for _, m := range b.modes() {
		for attempt := 0; ; attempt++ {
			if tracked {
				if err := b.flushConntrack(ctx); err != nil {
					return err
				}
			}
			b.waitQuiet(ctx)
			var bpfBefore map[string]ebpf.ProgramStats
			if m.mode == "rate" && c.path.isKpr() {
				bpfBefore = b.kprRunStats()
			}
			before := b.cpu.snapshot()
			proxyBefore := procCPU(run.proxyPID)
			result, err := b.loadgenRun(ctx, c.cgroupFD, m.warm+m.length, b.clientCPUs, b.clientArgs(m, c)...)
			if err != nil {
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
				run.Retaken = append(run.Retaken, Retake{Client: c.path, Mode: m.mode, Others: others, Result: result})
				b.disturbedSpent += after.at.Sub(before.at)
				b.disturbed = true
				continue
			}
			m.set(s, result, others)
			if run.proxyPID > 0 {
				s.ProxyCPUSeconds += max(0, procCPU(run.proxyPID)-proxyBefore)
			}
			s.Seconds += after.at.Sub(before.at).Seconds()
			if m.mode == "rate" {
				s.RateBusySeconds = float64(after.busy-before.busy) / clkTck
				s.RateSpanSeconds = after.at.Sub(before.at).Seconds()
				s.RateBPF = bpfRun
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

// kprRunStats reads the run-time statistics of kpr's programs before a measurement of kpr's
// client; nil when the statistics are off.
func (b *bench) kprRunStats() map[string]ebpf.ProgramStats {
	if b.bpfStats == nil {
		return nil
	}
	st, err := bpf.RunStats(b.kpr.PinDir)
	if err != nil {
		b.log("BPF run-time statistics: %v", err)
		return nil
	}
	return st
}

// add is r and d together; nil counts as nothing.
func (r *BPFRun) add(d *BPFRun) *BPFRun {
	if d == nil {
		return r
	}
	if r == nil {
		r = &BPFRun{ByProgram: map[string][2]uint64{}}
	}
	r.Runs += d.Runs
	r.Nanos += d.Nanos
	for name, v := range d.ByProgram {
		w := r.ByProgram[name]
		r.ByProgram[name] = [2]uint64{w[0] + v[0], w[1] + v[1]}
	}
	return r
}

// kprRunDelta is what kpr's programs did since before.
func (b *bench) kprRunDelta(before map[string]ebpf.ProgramStats) *BPFRun {
	after, err := bpf.RunStats(b.kpr.PinDir)
	if err != nil {
		b.log("BPF run-time statistics: %v", err)
		return nil
	}
	return bpfDelta(before, after)
}

// bpfDelta is what the programs did between two readings; nil when either is missing.
func bpfDelta(before, after map[string]ebpf.ProgramStats) *BPFRun {
	if before == nil || after == nil {
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
