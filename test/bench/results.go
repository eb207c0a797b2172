package bench

import (
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/kpr-dev/kpr/test/loadgen/report"
)

// The targets for kpr.
const (
	targetWithin       = 0.03            // of the direct path, both scales
	targetFirstAnswer  = 2 * time.Second // with targetScale Services
	targetMemory       = 150 << 20       // VmHWM with targetScale Services
	targetScale        = 10000           // Services
	maxNotesPerRawLine = 4
)

// Results is everything one run measured.
type Results struct {
	// Scenario is what was measured; empty in runs from before the NodePort scenario existed.
	Scenario Scenario       `json:"scenario,omitempty"`
	Command  string         `json:"command"`
	Machine  Machine        `json:"machine"`
	Pinning  string         `json:"pinning,omitempty"`
	Versions []KV           `json:"versions"`
	Config   ConfigSummary  `json:"config"`
	Started  time.Time      `json:"started"`
	Finished time.Time      `json:"finished"`
	Scales   []*ScaleResult `json:"scales"`
	Notes    []string       `json:"notes,omitempty"`
	Err      string         `json:"error,omitempty"`
}

// ConfigSummary is the Config as reported.
type ConfigSummary struct {
	Scales                    []int   `json:"scales"`
	Pairs                     int     `json:"pairs"`
	ControlPairs              int     `json:"control_pairs,omitempty"`
	Slice                     string  `json:"slice,omitempty"` // pairs interleaved in slices of this (empty: one sample after the other)
	Paths                     []Path  `json:"paths"`
	Rounds                    int     `json:"rounds"`
	Workers                   int     `json:"workers"`
	EndpointsPerService       int     `json:"endpoints_per_service"`
	CreateParallelism         int     `json:"create_parallelism"`
	RateWarmup                string  `json:"rate_warmup"`
	RateDuration              string  `json:"rate_duration"`
	LatencyWarmup             string  `json:"latency_warmup"`
	LatencyDuration           string  `json:"latency_duration"`
	RequestTimeout            string  `json:"request_timeout"`
	KprFirstAnswerLimit       string  `json:"kpr_first_answer_limit"`
	KubeProxyFirstAnswerLimit string  `json:"kube_proxy_first_answer_limit"`
	KprRev                    string  `json:"kpr_rev,omitempty"`
	OthersLimit               float64 `json:"others_limit"`
	Retakes                   int     `json:"retakes"`
	DisturbanceBudget         string  `json:"disturbance_budget"`
}

func summarizeConfig(c Config) ConfigSummary {
	return ConfigSummary{
		Scales: c.Scales, Pairs: c.Pairs, ControlPairs: c.ControlPairs, Slice: c.Slice.String(), Paths: c.Paths, Rounds: c.Rounds, Workers: c.Workers,
		EndpointsPerService: c.EndpointsPerService, CreateParallelism: c.CreateParallelism,
		RateWarmup: c.RateWarmup.String(), RateDuration: c.RateDuration.String(),
		LatencyWarmup: c.LatencyWarmup.String(), LatencyDuration: c.LatencyDuration.String(),
		RequestTimeout:            c.RequestTimeout.String(),
		KprFirstAnswerLimit:       c.KprFirstAnswerLimit.String(),
		KubeProxyFirstAnswerLimit: c.KubeProxyFirstAnswerLimit.String(),
		KprRev:                    c.KprRev,
		OthersLimit:               c.OthersLimit,
		Retakes:                   c.Retakes,
		DisturbanceBudget:         c.DisturbanceBudget.String(),
	}
}

// ScaleResult is one Service count.
type ScaleResult struct {
	Services int `json:"services"`
	// Created filler Services (and slices) for this scale, and how long that took.
	Created       int           `json:"created"`
	CreateSeconds float64       `json:"create_seconds"`
	Paths         []*PathResult `json:"paths"`
}

// PathResult is one path at one scale, every round.
type PathResult struct {
	Path    Path       `json:"path"`
	Runs    []*PathRun `json:"runs"`
	Skipped string     `json:"skipped,omitempty"`
}

// PathRun is one path measured once.
type PathRun struct {
	Path     Path `json:"path"`
	Round    int  `json:"round"`
	Position int  `json:"position"` // in the round's order
	// Load1 and ForeignNetns, taken before the run, show whether others shared the CPUs.
	Load1        float64 `json:"load1"`
	ForeignNetns int     `json:"foreign_netns"`

	HasFirstAnswer   bool          `json:"has_first_answer"`
	Answered         bool          `json:"answered"`
	FirstAnswer      time.Duration `json:"first_answer_ns"`
	FirstAnswerLimit time.Duration `json:"first_answer_limit_ns"`
	FirstAttempts    int64         `json:"first_attempts"`
	SyncedSeconds    float64       `json:"synced_seconds,omitempty"` // kpr: until its status says synced

	// Samples of the path's own client, taken alone.
	Samples []*Sample `json:"samples"`
	// Pairs (kpr runs): the path's client and the direct client, interleaved (see Pair).
	Pairs []*Pair `json:"pairs,omitempty"`
	// ControlPairs (kpr runs, ClusterIP): pairs measured the same way with a second direct
	// client (DirectControl) as the own side.
	ControlPairs []*Pair `json:"control_pairs,omitempty"`
	// Retaken lists the measurements discarded for disturbance (not in any figure).
	Retaken []Retake `json:"retaken,omitempty"`

	MemAfterSync    Mem   `json:"mem_after_sync"`
	MemAfterTraffic Mem   `json:"mem_after_traffic"`
	MapMemlock      int64 `json:"map_memlock,omitempty"`
	// NftRules: the rules in the node namespace's nftables ruleset once the proxy answers
	// (HasNftRules: counted).
	NftRules    int    `json:"nft_rules,omitempty"`
	HasNftRules bool   `json:"has_nft_rules,omitempty"`
	Programmed  string `json:"programmed,omitempty"`
	// FullSync: kpr's full sync, forced after the traffic so the memory includes it.
	FullSync string `json:"full_sync,omitempty"`
	// NorthSouth: kpr's tc and XDP counters at the end of a NodePort run.
	NorthSouth         *NorthSouthCounters `json:"north_south,omitempty"`
	ConntrackAfterRate int64               `json:"conntrack_after_rate,omitempty"`

	Notes []string `json:"notes,omitempty"`
	Err   string   `json:"error,omitempty"`

	proxyPID int // the proxy process while it runs, for ProxyCPUSeconds
}

// NorthSouthCounters are kpr's north-south counters at the end of a run (from kpr's start, as
// each run starts from an empty pin directory).
type NorthSouthCounters struct {
	Flows     uint64 `json:"flows"`
	Forwarded uint64 `json:"forwarded"` // packets to a backend
	Replies   uint64 `json:"replies"`   // backends' packets back to the client
	XDPTx     uint64 `json:"xdp_tx"`    // of both, sent by the XDP program
	// Other holds kpr's other counters that are not zero (drops, refusals, packets left to the
	// stack), by their bpf.NodePortStats name, so that a failed request can be traced to them.
	Other map[string]uint64 `json:"other,omitempty"`
}

// Sample is one set of client measurements: connection rate, then latency on new and on
// established connections.
type Sample struct {
	// Client is whose client took it: the run's path, or direct between kpr's samples.
	Client      Path        `json:"client"`
	Rate        *report.Run `json:"rate,omitempty"`
	Fresh       *report.Run `json:"fresh,omitempty"`
	Established *report.Run `json:"established,omitempty"`
	// The share of the machine's CPU that processes outside the sandbox (and the hypervisor's
	// steal) took during each measurement.
	RateOthers        float64 `json:"rate_others_cpu"`
	FreshOthers       float64 `json:"fresh_others_cpu"`
	EstablishedOthers float64 `json:"established_others_cpu"`
	// ProxyCPUSeconds is the CPU time the running proxy process (kpr or kube-proxy) used
	// during the sample's Seconds of measurements: its control plane's share of the machine.
	ProxyCPUSeconds float64 `json:"proxy_cpu_seconds,omitempty"`
	Seconds         float64 `json:"seconds"`
	// RateBusySeconds is the CPU time the whole machine spent working (user, system, irq,
	// softirq; all CPUs) during the connection-rate measurement.
	RateBusySeconds float64 `json:"rate_busy_seconds,omitempty"`
	RateSpanSeconds float64 `json:"rate_span_seconds,omitempty"` // wall time of that measurement, warm-up and start included
	// RateBPF is what the kernel counted for kpr's attached programs during the
	// connection-rate measurement (kpr's samples, with BPF run-time statistics enabled).
	RateBPF *BPFRun `json:"rate_bpf,omitempty"`
}

// BPFRun is the kernel's run-time statistics of kpr's programs over one measurement, summed
// over the programs.
type BPFRun struct {
	Runs      uint64               `json:"runs"`
	Nanos     uint64               `json:"nanos"`
	ByProgram map[string][2]uint64 `json:"by_program,omitempty"` // name: runs, nanos
}

// OthersCPU is the largest share others took during the sample's measurements.
func (s *Sample) OthersCPU() float64 {
	return max(s.RateOthers, s.FreshOthers, s.EstablishedOthers)
}

// Pair is a sample of the run's path and one of direct: interleaved in slices of
// SliceSeconds (see measurePair), or, in results written before that, one right after the
// other (SliceSeconds 0).
type Pair struct {
	Path         *Sample `json:"path"`
	Direct       *Sample `json:"direct"`
	DirectFirst  bool    `json:"direct_first"` // direct took the first slice (went first)
	SliceSeconds float64 `json:"slice_seconds,omitempty"`
}

// Retake is a measurement that was discarded and taken again because other processes used
// the CPUs meanwhile.
type Retake struct {
	Client Path        `json:"client"`
	Mode   string      `json:"mode"`
	Others float64     `json:"others_cpu"`
	Result *report.Run `json:"result"`
}

func (s *Sample) runs() []*report.Run {
	var out []*report.Run
	for _, x := range []*report.Run{s.Rate, s.Fresh, s.Established} {
		if x != nil {
			out = append(out, x)
		}
	}
	return out
}

func (s *Sample) failed() (failed, total int64) {
	for _, x := range s.runs() {
		failed += x.Failed
		total += x.OK + x.Failed
	}
	return failed, total
}

// own are the samples of the run's own path, alone and in pairs.
func (r *PathRun) own() []*Sample {
	var out []*Sample
	for _, s := range r.Samples {
		if s.Client == r.Path {
			out = append(out, s)
		}
	}
	for _, p := range pairs(r) {
		out = append(out, p[0])
	}
	return out
}

// metric is one figure of a sample; false when the sample lacks it.
type metric func(*Sample) (float64, bool)

func connPerSec(s *Sample) (float64, bool) {
	if s.Rate == nil {
		return 0, false
	}
	return s.Rate.PerSecond, true
}

// percentiles reported: p50, p90, p99.
func latencyAt(which func(*Sample) *report.Run, q int) metric {
	return func(s *Sample) (float64, bool) {
		x := which(s)
		if x == nil || x.Latency.N == 0 {
			return 0, false
		}
		return [3]float64{x.Latency.P50, x.Latency.P90, x.Latency.P99}[q], true
	}
}

func freshOf(s *Sample) *report.Run       { return s.Fresh }
func establishedOf(s *Sample) *report.Run { return s.Established }

// mean of m over samples.
func mean(samples []*Sample, m metric) (float64, bool) {
	var sum float64
	n := 0
	for _, s := range samples {
		if v, ok := m(s); ok {
			sum += v
			n++
		}
	}
	if n == 0 {
		return 0, false
	}
	return sum / float64(n), true
}

func (r *PathRun) oneLine() string {
	var parts []string
	if r.HasFirstAnswer {
		parts = append(parts, "first answer "+r.firstAnswer())
	}
	describe := func(samples []*Sample) string {
		var p []string
		if v, ok := mean(samples, connPerSec); ok {
			p = append(p, fmt.Sprintf("%.0f conn/s", v))
		}
		var f, t int64
		for _, s := range samples {
			ff, tt := s.failed()
			f, t = f+ff, t+tt
		}
		p = append(p, fmt.Sprintf("%d of %d failed", f, t))
		if v, ok := mean(samples, latencyAt(freshOf, 0)); ok {
			p = append(p, fmt.Sprintf("new-connection p50 %.0fµs", v))
		}
		if v, ok := mean(samples, latencyAt(establishedOf, 0)); ok {
			p = append(p, fmt.Sprintf("established p50 %.0fµs", v))
		}
		return strings.Join(p, ", ")
	}
	if len(r.Samples) > 0 {
		parts = append(parts, describe(r.Samples))
	}
	if ps := pairs(r); len(ps) > 0 {
		var own, direct []*Sample
		for _, p := range ps {
			own, direct = append(own, p[0]), append(direct, p[1])
		}
		parts = append(parts, fmt.Sprintf("in pairs: %s %s; direct %s", r.Path, describe(own), describe(direct)))
	}
	if r.MemAfterSync.RSS > 0 {
		parts = append(parts, "RSS "+fmtMiB(r.MemAfterSync.RSS))
	}
	parts = append(parts, fmt.Sprintf("load %.2f", r.Load1))
	if r.ForeignNetns > 0 {
		parts = append(parts, fmt.Sprintf("%d other network namespaces", r.ForeignNetns))
	}
	return strings.Join(parts, "; ")
}

func (p Path) String() string { return string(p) }

func (r *PathRun) firstAnswer() string {
	if !r.HasFirstAnswer {
		return "–"
	}
	if !r.Answered {
		return fmt.Sprintf("> %s (did not answer)", fmtDuration(r.FirstAnswerLimit))
	}
	return fmtSeconds(r.FirstAnswer.Seconds())
}

// Stat is the median and range of one figure, and a confidence interval of the median.
type Stat struct {
	N      int     `json:"n"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	// CILo..CIHi holds the median with at least 95% confidence (distribution-free: order
	// statistics of the binomial); with fewer than 6 values it is the whole range and less.
	CILo float64 `json:"ci_lo"`
	CIHi float64 `json:"ci_hi"`
}

func statOf(vals []float64) Stat {
	if len(vals) == 0 {
		return Stat{}
	}
	s := slices.Clone(vals)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	k := medianCIRank(len(s))
	return Stat{N: len(s), Median: med, Min: s[0], Max: s[len(s)-1], CILo: s[k], CIHi: s[len(s)-1-k]}
}

// medianCIRank is the largest k with P(Binomial(n, 1/2) <= k) <= 2.5%: the median is below the
// (k+1)-th smallest of n values only if at most k of them are below it, so that value and the
// (k+1)-th largest bound the median with at least 95% confidence. With n < 6 no k qualifies and
// the whole range (k = 0) is returned, with less confidence.
func medianCIRank(n int) int {
	best := 0
	var p float64
	c := 1.0 // C(n, k)
	for k := 0; k <= (n-1)/2; k++ {
		if k > 0 {
			c = c * float64(n-k+1) / float64(k)
		}
		p += c / math.Pow(2, float64(n))
		if p > 0.025 {
			break
		}
		best = k
	}
	return best
}

// Summary is a path at a scale over its rounds: per run, the mean of its own client's
// samples; over runs, the median and range.
type Summary struct {
	Path        Path
	Runs        int
	FirstAnswer Stat // seconds, of the runs that answered
	NotAnswered int
	FirstLimit  time.Duration
	ConnPerSec  Stat
	Failed      int64 // requests by the path's own client
	Requests    int64
	Fresh       [3]Stat // p50, p90, p99 in µs
	Established [3]Stat
	MaxRSS      int64
	MaxHWM      int64
	Skipped     string

	// Paired: in runs that also have direct samples (kpr's), each two consecutive samples
	// (one of the path's, one direct) give the path's figure over direct's, as a fraction;
	// the stats are over all such pairs at the scale.
	PairedRuns        int
	Pairs             int
	DisturbedPairs    int // pairs where others took more than the limit during a measurement; their figures are left out
	PairedConn        Stat
	PairedFresh       [3]Stat
	PairedEstablished [3]Stat
	PairedDirectConn  Stat // the direct samples' connection rate
	// ControlConn is the connection rate of the control pairs' two direct sides, one over the
	// other (the DirectControl side over the direct side), over their undisturbed pairs.
	ControlConn Stat

	// The datapath's own cost, from kpr's paired samples with BPF run-time statistics: per
	// new connection, the run time of kpr's programs (ns) and how many of them ran, and that
	// time as a share of the machine's CPU time per connection on the direct path.
	BPFNanosPerConn Stat
	// DirectBPFNanosPerConn, DirectBPFShare: kpr's programs' run time during the paired
	// direct samples (the tc programs on the pods' devices), per direct connection, and as a
	// share of the machine's CPU time per direct connection.
	DirectBPFNanosPerConn Stat
	DirectBPFShare        Stat
	BPFRunsPerConn        Stat
	BPFShare              Stat
	DirectCPUPerConn      Stat // µs
	// BPFNanosPerRun: kpr's tc and XDP programs (NodePort), run time per program run, which is
	// one per packet on eth0; BPFRunsPerConn then holds their runs per new connection.
	BPFNanosPerRun Stat

	// CPUPerConn is the CPU time the whole machine spent per new connection in the path's own
	// connection-rate measurements (µs; client, servers, proxy and kernel alike), from runs'
	// means.
	CPUPerConn Stat
}

// pairs are the run's pairs as (path, direct).
func pairs(r *PathRun) [][2]*Sample { return pairSamples(r.Pairs) }

// pairSamples are ps as (own side, direct), without the pairs missing a side.
func pairSamples(ps []*Pair) [][2]*Sample {
	var out [][2]*Sample
	for _, p := range ps {
		if p.Path != nil && p.Direct != nil {
			out = append(out, [2]*Sample{p.Path, p.Direct})
		}
	}
	return out
}

func summarize(pr *PathResult, othersLimit float64) Summary {
	s := Summary{Path: pr.Path, Skipped: pr.Skipped}
	var first, rate, pDirect []float64
	var bpfNanos, bpfRuns, bpfShare, directCPU, bpfPerRun, cpuPerConn, directBPF, directBPFShare []float64
	var fresh, est [3][]float64
	var pConn ratios
	var pFresh, pEst [3]ratios
	for _, r := range pr.Runs {
		s.Runs++
		if r.HasFirstAnswer {
			s.FirstLimit = r.FirstAnswerLimit
			if r.Answered {
				first = append(first, r.FirstAnswer.Seconds())
			} else {
				s.NotAnswered++
			}
		}
		own := r.own()
		for _, x := range own {
			f, t := x.failed()
			s.Failed += f
			s.Requests += t
		}
		if v, ok := mean(own, connPerSec); ok {
			rate = append(rate, v)
		}
		if v, ok := mean(own, machineCPUPerConn); ok {
			cpuPerConn = append(cpuPerConn, v)
		}
		for q := range 3 {
			if v, ok := mean(own, latencyAt(freshOf, q)); ok {
				fresh[q] = append(fresh[q], v)
			}
			if v, ok := mean(own, latencyAt(establishedOf, q)); ok {
				est[q] = append(est[q], v)
			}
		}
		for _, m := range []Mem{r.MemAfterSync, r.MemAfterTraffic} {
			s.MaxRSS = max(s.MaxRSS, m.RSS)
			s.MaxHWM = max(s.MaxHWM, m.HWM)
		}
		if len(r.Pairs) > 0 {
			s.PairedRuns++
		}
		for _, p := range pairs(r) {
			s.Pairs++
			if max(p[0].OthersCPU(), p[1].OthersCPU()) > othersLimit {
				s.DisturbedPairs++
			}
			if c, ok := bpfCost(p[0], p[1]); ok {
				bpfNanos = append(bpfNanos, c.nanosPerConn)
				bpfRuns = append(bpfRuns, c.runsPerConn)
				bpfShare = append(bpfShare, c.share)
				directCPU = append(directCPU, c.directMicros)
				if c.directBPF > 0 {
					directBPF = append(directBPF, c.directBPF)
					directBPFShare = append(directBPFShare, c.directBPF/(c.directMicros*1e3))
				}
			} else if k := p[0]; k.RateBPF != nil && k.RateBPF.Runs > 0 && k.Rate != nil && k.Rate.PerSecond > 0 && k.RateSpanSeconds > 0 {
				// No socket hook ran (NodePort): the tc and XDP programs, per run.
				bpfPerRun = append(bpfPerRun, float64(k.RateBPF.Nanos)/float64(k.RateBPF.Runs))
				bpfRuns = append(bpfRuns, float64(k.RateBPF.Runs)/(k.Rate.PerSecond*k.RateSpanSeconds))
			}
			pConn.add(p, connPerSec, rateOthers, othersLimit)
			if v, ok := connPerSec(p[1]); ok {
				pDirect = append(pDirect, v)
			}
			for q := range 3 {
				pFresh[q].add(p, latencyAt(freshOf, q), freshOthers, othersLimit)
				pEst[q].add(p, latencyAt(establishedOf, q), establishedOthers, othersLimit)
			}
		}
	}
	s.FirstAnswer = statOf(first)
	s.ConnPerSec = statOf(rate)
	s.PairedConn = pConn.stat()
	s.ControlConn = controlConn(pr.Runs, othersLimit)
	s.PairedDirectConn = statOf(pDirect)
	s.BPFNanosPerConn, s.BPFRunsPerConn, s.BPFShare, s.DirectCPUPerConn = statOf(bpfNanos), statOf(bpfRuns), statOf(bpfShare), statOf(directCPU)
	s.BPFNanosPerRun, s.CPUPerConn = statOf(bpfPerRun), statOf(cpuPerConn)
	s.DirectBPFNanosPerConn, s.DirectBPFShare = statOf(directBPF), statOf(directBPFShare)
	for q := range 3 {
		s.Fresh[q] = statOf(fresh[q])
		s.Established[q] = statOf(est[q])
		s.PairedFresh[q] = pFresh[q].stat()
		s.PairedEstablished[q] = pEst[q].stat()
	}
	return s
}

// controlConn is the connection-rate ratio over the runs' control pairs.
func controlConn(runs []*PathRun, othersLimit float64) Stat {
	var r ratios
	for _, run := range runs {
		for _, p := range pairSamples(run.ControlPairs) {
			r.add(p, connPerSec, rateOthers, othersLimit)
		}
	}
	return r.stat()
}

// machineCPUPerConn is the CPU time (µs) the machine spent per new connection during the
// sample's connection-rate measurement: its busy time over the connections made, the warm-up
// counted at the measured rate.
func machineCPUPerConn(s *Sample) (float64, bool) {
	if s.Rate == nil || s.Rate.PerSecond <= 0 || s.RateSpanSeconds <= 0 || s.RateBusySeconds <= 0 {
		return 0, false
	}
	return s.RateBusySeconds * 1e6 / (s.Rate.PerSecond * s.RateSpanSeconds), true
}

// datapathCost is what kpr's programs cost per new connection in one pair.
type datapathCost struct {
	nanosPerConn, runsPerConn float64
	share                     float64 // of directMicros
	directMicros              float64 // machine CPU time per connection on the direct path
	directBPF                 float64 // ns of kpr's programs per direct connection (interleaved pairs)
}

// bpfCost compares, in one pair, the run time of kpr's programs per connection (connect4 and
// connect6 run once per connect) with the CPU time the whole machine spent per connection in
// the direct sample: busy time over connections made, the warm-up counted at the measured rate.
func bpfCost(k, d *Sample) (datapathCost, bool) {
	if k.RateBPF == nil || d.Rate == nil || d.Rate.PerSecond <= 0 || d.RateSpanSeconds <= 0 || d.RateBusySeconds <= 0 {
		return datapathCost{}, false
	}
	conns := k.RateBPF.ByProgram["connect4"][0] + k.RateBPF.ByProgram["connect6"][0]
	if conns == 0 {
		return datapathCost{}, false
	}
	c := datapathCost{
		nanosPerConn: float64(k.RateBPF.Nanos) / float64(conns),
		runsPerConn:  float64(k.RateBPF.Runs) / float64(conns),
		directMicros: d.RateBusySeconds * 1e6 / (d.Rate.PerSecond * d.RateSpanSeconds),
	}
	c.share = c.nanosPerConn / (c.directMicros * 1e3)
	if d.RateBPF != nil && d.Rate.OK > 0 {
		c.directBPF = float64(d.RateBPF.Nanos) / float64(d.Rate.OK)
	}
	return c, true
}

// ratios of one figure over pairs: all of them, and those no other process disturbed.
type ratios struct{ clean, all []float64 }

// add records pair p's figure m, own side over direct, if both sides have it; clean too when
// others took no more than othersLimit during either side's measurement.
func (r *ratios) add(p [2]*Sample, m metric, others func(*Sample) float64, othersLimit float64) {
	a, okA := m(p[0])
	b, okB := m(p[1])
	if !okA || !okB || b == 0 {
		return
	}
	r.all = append(r.all, a/b)
	if max(others(p[0]), others(p[1])) <= othersLimit {
		r.clean = append(r.clean, a/b)
	}
}

// stat is over the undisturbed pairs, or over all when every pair was disturbed.
func (r ratios) stat() Stat {
	if len(r.clean) > 0 {
		return statOf(r.clean)
	}
	return statOf(r.all)
}

func rateOthers(s *Sample) float64        { return s.RateOthers }
func freshOthers(s *Sample) float64       { return s.FreshOthers }
func establishedOthers(s *Sample) float64 { return s.EstablishedOthers }

func (s Summary) firstAnswer() string {
	switch {
	case s.FirstLimit == 0:
		return "–"
	case s.FirstAnswer.N == 0 && s.NotAnswered > 0:
		return fmt.Sprintf("> %s (did not answer)", fmtDuration(s.FirstLimit))
	}
	out := fmtSeconds(s.FirstAnswer.Median)
	if s.FirstAnswer.N > 1 {
		out += fmt.Sprintf(" [%s–%s]", strings.TrimSuffix(fmtSeconds(s.FirstAnswer.Min), " s"), strings.TrimSuffix(fmtSeconds(s.FirstAnswer.Max), " s"))
	}
	if s.NotAnswered > 0 {
		out += fmt.Sprintf(", %d run(s) did not answer within %s", s.NotAnswered, fmtDuration(s.FirstLimit))
	}
	return out
}

// Target is one of the targets with what was measured.
type Target struct {
	Name     string `json:"name"`
	Measured string `json:"measured"`
	Met      *bool  `json:"met"` // nil: not measured in this run
	// WithinNoise: the verdict is the median's, but the median's 95% interval also holds
	// values on the other side of the target.
	WithinNoise bool `json:"within_noise,omitempty"`
}

func (t Target) verdict() string {
	switch {
	case t.Met == nil:
		return "not measured"
	case *t.Met && t.WithinNoise:
		return "met by the median, within noise"
	case *t.Met:
		return "met"
	case t.WithinNoise:
		return "**MISSED** by the median, within noise"
	}
	return "**MISSED**"
}

func (r *Results) summaries(sr *ScaleResult) map[Path]Summary {
	out := map[Path]Summary{}
	for _, pr := range sr.Paths {
		out[pr.Path] = summarize(pr, r.Config.OthersLimit)
	}
	return out
}

// Targets evaluates the targets for kpr. "Within 3% of the direct path" is judged on
// the paired comparison (kpr and direct samples in turn within each kpr run; the median over
// runs of kpr's mean over direct's mean): the new-connection rate at least 97% of direct's,
// and the p50 request latency, on a new and on an established connection, at most 103%.
// Without paired samples the medians of the separate runs are used. p90 and p99 are
// reported, not judged.
func (r *Results) Targets() []Target {
	if r.Scenario == NodePort {
		return r.nodePortTargets()
	}
	var ts []Target
	yes := func(b bool) *bool { return &b }
	for _, sr := range r.Scales {
		sum := r.summaries(sr)
		d, okD := sum[Direct]
		k, okK := sum[Kpr]
		label := fmtCount(sr.Services) + " " + plural(sr.Services, "Service", "Services")
		add := func(name string, paired Stat, kv, dv float64, higherIsBetter bool) {
			t := Target{Name: fmt.Sprintf("%s, %s", name, label), Measured: "–"}
			ok := func(ratio float64) bool {
				if higherIsBetter {
					return ratio >= 1-targetWithin
				}
				return ratio <= 1+targetWithin
			}
			switch {
			case okK && paired.N > 0:
				t.Measured = fmt.Sprintf("%.1f%% of direct (median of %d pairs; 95%% interval %.1f–%.1f%%)", 100*paired.Median, paired.N, 100*paired.CILo, 100*paired.CIHi)
				t.Met = yes(ok(paired.Median))
				t.WithinNoise = ok(paired.CILo) != ok(paired.CIHi)
			case okD && okK && kv > 0 && dv > 0:
				t.Measured = fmt.Sprintf("%.1f%% of direct (separate runs: %s vs %s)", 100*kv/dv, fmtNum(kv, 0), fmtNum(dv, 0))
				t.Met = yes(ok(kv / dv))
			}
			ts = append(ts, t)
		}
		add("kpr new connections/s ≥ 97% of direct", k.PairedConn, k.ConnPerSec.Median, d.ConnPerSec.Median, true)
		add("kpr request latency on a new connection, p50 ≤ 103% of direct", k.PairedFresh[0], k.Fresh[0].Median, d.Fresh[0].Median, false)
		add("kpr request latency on an established connection, p50 ≤ 103% of direct", k.PairedEstablished[0], k.Established[0].Median, d.Established[0].Median, false)
		cost := Target{Name: fmt.Sprintf("kpr's BPF programs' CPU time per new connection ≤ 3%% of the machine's CPU time per direct connection, %s", label), Measured: "–"}
		if okK && k.BPFShare.N > 0 {
			cost.Measured = fmt.Sprintf("%s ns in %.1f program runs per connection = %.3f%% of the %s µs a direct connection costs (median of %d pairs; 95%% interval %.3f–%.3f%%)",
				fmtNum(k.BPFNanosPerConn.Median, 0), k.BPFRunsPerConn.Median, 100*k.BPFShare.Median, fmtNum(k.DirectCPUPerConn.Median, 0), k.BPFShare.N, 100*k.BPFShare.CILo, 100*k.BPFShare.CIHi)
			cost.Met = yes(k.BPFShare.Median <= targetWithin)
			cost.WithinNoise = (k.BPFShare.CILo <= targetWithin) != (k.BPFShare.CIHi <= targetWithin)
		}
		ts = append(ts, cost)
	}
	// No failed connection through kpr, at any scale.
	var failed, total int64
	for _, sr := range r.Scales {
		if s, ok := r.summaries(sr)[Kpr]; ok {
			failed += s.Failed
			total += s.Requests
		}
	}
	t := Target{Name: "no failed connection through kpr (all scales, all runs)", Measured: "–"}
	if total > 0 {
		t.Measured = fmt.Sprintf("%s failed of %s requests", fmtCount(int(failed)), fmtCount(int(total)))
		t.Met = yes(failed == 0)
	}
	ts = append(ts, t)

	first := Target{Name: fmt.Sprintf("%s Services answer within %s of kpr's start", fmtCount(targetScale), fmtDuration(targetFirstAnswer)), Measured: "–"}
	mem := Target{Name: fmt.Sprintf("kpr resident memory (VmHWM) under %s with %s Services", fmtMiB(targetMemory), fmtCount(targetScale)), Measured: "–"}
	for _, sr := range r.Scales {
		if sr.Services < targetScale {
			continue
		}
		k, ok := r.summaries(sr)[Kpr]
		if !ok || k.Runs == 0 {
			continue
		}
		if n := k.FirstAnswer.N + k.NotAnswered; n > 0 {
			first.Measured = fmt.Sprintf("%s Services: median %s, worst %s over %d run(s)", fmtCount(sr.Services), fmtSeconds(k.FirstAnswer.Median), fmtSeconds(k.FirstAnswer.Max), n)
			if k.NotAnswered > 0 {
				first.Measured = fmt.Sprintf("%s Services: %d of %d run(s) did not answer within %s", fmtCount(sr.Services), k.NotAnswered, n, fmtDuration(k.FirstLimit))
			}
			first.Met = yes(k.NotAnswered == 0 && k.FirstAnswer.Max <= targetFirstAnswer.Seconds())
		}
		if k.MaxHWM > 0 {
			mem.Measured = fmt.Sprintf("%s Services: VmHWM %s, VmRSS %s (largest over %d run(s))", fmtCount(sr.Services), fmtMiB(k.MaxHWM), fmtMiB(k.MaxRSS), k.Runs)
			mem.Met = yes(k.MaxHWM < targetMemory)
		}
		break
	}
	return append(ts, first, mem, r.nftTarget())
}

// nodePortTargets: the issue sets no figure for NodePort traffic, only that it be measured;
// what is judged is that no request through kpr failed, on either path.
func (r *Results) nodePortTargets() []Target {
	var ts []Target
	for _, p := range []Path{KprTC, KprXDP} {
		var failed, total int64
		for _, sr := range r.Scales {
			if s, ok := r.summaries(sr)[p]; ok {
				failed += s.Failed
				total += s.Requests
			}
		}
		t := Target{Name: fmt.Sprintf("no failed request through %s (all runs)", p), Measured: "–"}
		if total > 0 {
			met := failed == 0
			t.Measured = fmt.Sprintf("%s failed of %s requests", fmtCount(int(failed)), fmtCount(int(total)))
			t.Met = &met
		}
		ts = append(ts, t)
	}
	return ts
}

// nftTarget: kpr's nftables table holds no rule per Service, so its rule count is the same at
// every scale (kube-proxy nftables' grows with the Services; shown beside it).
func (r *Results) nftTarget() Target {
	t := Target{Name: "kpr's nftables rules do not grow with the Services (no rule per Service)", Measured: "–"}
	counts := map[int]bool{}
	var parts []string
	for _, sr := range r.Scales {
		for _, pr := range sr.Paths {
			if pr.Path != Kpr && pr.Path != KubeProxyNFTables {
				continue
			}
			seen := map[int]bool{}
			var ns []string
			for _, run := range pr.Runs {
				if run.HasNftRules && !seen[run.NftRules] {
					seen[run.NftRules] = true
					ns = append(ns, fmtCount(run.NftRules))
					if pr.Path == Kpr {
						counts[run.NftRules] = true
					}
				}
			}
			if len(ns) > 0 {
				parts = append(parts, fmt.Sprintf("%s at %s %s: %s", pr.Path, fmtCount(sr.Services), plural(sr.Services, "Service", "Services"), strings.Join(ns, ", ")))
			}
		}
	}
	if len(parts) > 0 {
		t.Measured = strings.Join(parts, "; ")
	}
	if len(counts) > 0 && len(r.Scales) > 1 {
		met := len(counts) == 1
		t.Met = &met
	}
	return t
}

// Table is the figures per scale and path as Markdown: what the command prints and the
// results file shows.
func (r *Results) Table() string {
	var b strings.Builder
	for _, sr := range r.Scales {
		sum := r.summaries(sr)
		fmt.Fprintf(&b, "### %s %s\n\n", fmtCount(sr.Services), plural(sr.Services, "Service", "Services"))
		if sr.Created > 0 {
			fmt.Fprintf(&b, "Creating %s Services and their EndpointSlices through the API (%d requests in flight) took %s.\n\n",
				fmtCount(sr.Created), r.Config.CreateParallelism, fmtSeconds(sr.CreateSeconds))
		}
		b.WriteString("| Path | First answer after start | New connections/s | vs direct | Failed | New-connection latency p50 / p90 / p99 | vs direct (p50) | Established-connection latency p50 / p90 / p99 | vs direct (p50) | Proxy memory VmRSS / VmHWM |\n")
		b.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
		d, okD := sum[Direct]
		for _, pr := range sr.Paths {
			s := sum[pr.Path]
			rel := func(v, base float64) string {
				if !okD || v == 0 || base == 0 {
					return "–"
				}
				return fmt.Sprintf("%.1f%%", 100*v/base)
			}
			conn := "–"
			if s.ConnPerSec.N > 0 {
				conn = fmtNum(s.ConnPerSec.Median, 0) + spread(s.ConnPerSec, 0)
			}
			failed := "–"
			if s.Requests > 0 {
				failed = fmt.Sprintf("%s of %s", fmtCount(int(s.Failed)), fmtCount(int(s.Requests)))
			}
			memory := "–"
			if s.MaxRSS > 0 {
				memory = fmtMiB(s.MaxRSS) + " / " + fmtMiB(s.MaxHWM)
			}
			name := string(pr.Path)
			if s.Skipped != "" && s.ConnPerSec.N == 0 {
				name += " (" + s.Skipped + ")"
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", name, s.firstAnswer(), conn,
				rel(s.ConnPerSec.Median, d.ConnPerSec.Median), failed,
				latencies(s.Fresh), rel(s.Fresh[0].Median, d.Fresh[0].Median),
				latencies(s.Established), rel(s.Established[0].Median, d.Established[0].Median), memory)
		}
		b.WriteString("\n")
		if r.Scenario == NodePort {
			var parts []string
			for _, pr := range sr.Paths {
				if st := sum[pr.Path].CPUPerConn; st.N > 0 {
					parts = append(parts, fmt.Sprintf("%s %s µs", pr.Path, fmtNum(st.Median, 0)+spread(st, 0)))
				}
			}
			if len(parts) > 0 {
				fmt.Fprintf(&b, "CPU time the whole machine spent per new connection in each path's own connection-rate measurements "+
					"(client, servers, proxy and kernel; busy time from /proc/stat over the connections made): %s.\n\n", strings.Join(parts, ", "))
			}
		}
		for _, pr := range sr.Paths {
			k := sum[pr.Path]
			if k.PairedRuns == 0 {
				continue
			}
			pct := func(st Stat) string {
				if st.N == 0 {
					return "–"
				}
				out := fmt.Sprintf("%.1f%%", 100*st.Median)
				if st.N > 1 {
					out += fmt.Sprintf(" [%.1f–%.1f]", 100*st.CILo, 100*st.CIHi)
				}
				return out
			}
			used := fmt.Sprintf("%d pairs in %d runs", k.Pairs, k.PairedRuns)
			if k.DisturbedPairs > 0 {
				used += fmt.Sprintf("; in %d pair(s) other processes took more than %.0f%% of the CPU during a measurement, which is left out", k.DisturbedPairs, 100*r.Config.OthersLimit)
			}
			how := "a %s sample and a direct sample one right after the other, in alternating order"
			if r.Config.Slice != "" {
				how = "a %s sample and a direct sample taken together, the two clients taking turns in slices of " + r.Config.Slice
			}
			fmt.Fprintf(&b, "%s against the direct path, paired: in each %s run, "+how+" (%s); %s as a percentage of direct, median and 95%% confidence interval of the median over the pairs:\n\n", pr.Path, pr.Path, pr.Path, used, pr.Path)
			b.WriteString("| New connections/s | New-connection latency p50 / p90 / p99 | Established-connection latency p50 / p90 / p99 | Direct new connections/s in the pairs |\n|---|---|---|---|\n")
			fmt.Fprintf(&b, "| %s | %s / %s / %s | %s / %s / %s | %s |\n\n", pct(k.PairedConn),
				pct(k.PairedFresh[0]), pct(k.PairedFresh[1]), pct(k.PairedFresh[2]),
				pct(k.PairedEstablished[0]), pct(k.PairedEstablished[1]), pct(k.PairedEstablished[2]),
				fmtNum(k.PairedDirectConn.Median, 0)+spread(k.PairedDirectConn, 0))
			if k.ControlConn.N > 0 {
				fmt.Fprintf(&b, "Control: in the same runs, %d pairs measured the same way with a direct client on both sides "+
					"(the second one in the first one's place, also to the pod IPs): new connections/s %s of the other side. "+
					"A method without bias gives 100%%; how far this strays is the noise the figures above carry.\n\n",
					k.ControlConn.N, pct(k.ControlConn))
			}
			if k.BPFNanosPerRun.N > 0 {
				fmt.Fprintf(&b, "%s's programs, from the kernel's BPF run-time statistics over the same connection-rate measurements: "+
					"%s ns per program run (one run per packet arriving on eth0), %.1f runs per new connection (%d pairs).\n\n",
					pr.Path, fmtNum(k.BPFNanosPerRun.Median, 0)+spread(k.BPFNanosPerRun, 0), k.BPFRunsPerConn.Median, k.BPFNanosPerRun.N)
			}
			if k.BPFShare.N > 0 {
				fmt.Fprintf(&b, "kpr's datapath cost, from the kernel's BPF run-time statistics over the same kpr connection-rate measurements: "+
					"%s ns of program run time per new connection (%.1f program runs), against %s µs of CPU time "+
					"the machine spends per direct connection: %.3f%% (95%% interval %.3f–%.3f%%, %d pairs).\n\n",
					fmtNum(k.BPFNanosPerConn.Median, 0)+spread(k.BPFNanosPerConn, 0), k.BPFRunsPerConn.Median,
					fmtNum(k.DirectCPUPerConn.Median, 0)+spread(k.DirectCPUPerConn, 0),
					100*k.BPFShare.Median, 100*k.BPFShare.CILo, 100*k.BPFShare.CIHi, k.BPFShare.N)
				if k.DirectBPFShare.N > 0 {
					fmt.Fprintf(&b, "Of that, the direct client's connections bore kpr's tc programs on the pods' devices too, "+
						"which run for every packet that enters the node from a pod: %s ns per direct connection, %.3f%% of its CPU time. "+
						"The paired ratios above leave this part out, since both sides of a pair pay it; the main table's direct row, "+
						"measured without kpr, does not.\n\n",
						fmtNum(k.DirectBPFNanosPerConn.Median, 0)+spread(k.DirectBPFNanosPerConn, 0), 100*k.DirectBPFShare.Median)
				}
			}
		}
	}
	if line := r.xdpShare(); line != "" {
		b.WriteString(line + "\n\n")
	}
	b.WriteString("### Targets\n\n| Target | Measured | Result |\n|---|---|---|\n")
	for _, t := range r.Targets() {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", t.Name, t.Measured, t.verdict())
	}
	return b.String()
}

func spread(st Stat, decimals int) string {
	if st.N < 2 {
		return ""
	}
	return fmt.Sprintf(" [%s–%s]", fmtNum(st.Min, decimals), fmtNum(st.Max, decimals))
}

func latencies(st [3]Stat) string {
	if st[0].N == 0 {
		return "–"
	}
	return fmt.Sprintf("%s / %s / %s µs", fmtNum(st[0].Median, 0), fmtNum(st[1].Median, 0), fmtNum(st[2].Median, 0))
}

// Markdown is the whole results file.
func (r *Results) Markdown() string {
	var b strings.Builder
	if r.Scenario == NodePort {
		b.WriteString("# NodePort benchmark: kpr (tc and XDP), upstream kube-proxy and the direct path\n\n")
	} else {
		b.WriteString("# ClusterIP benchmark: kpr, upstream kube-proxy and the direct path\n\n")
	}
	b.WriteString("<!-- Written by `make bench` (test/cmd/bench); rerun it rather than editing. -->\n\n")
	fmt.Fprintf(&b, "Run %s, took %s.\n\n", r.Started.UTC().Format("2006-01-02 15:04 UTC"), r.Finished.Sub(r.Started).Round(time.Second))
	if r.Err != "" {
		fmt.Fprintf(&b, "**The run did not complete:** %s\n\nThe figures below are what was measured before it stopped.\n\n", r.Err)
	}
	b.WriteString("## Command\n\n```sh\n" + r.Command + "\n```\n\n")
	b.WriteString("## Machine\n\n")
	m := r.Machine
	virt := ""
	if m.Virtual {
		virt = " (virtual machine)"
	}
	fmt.Fprintf(&b, "- CPU: %d × %s%s\n", m.CPUs, m.CPUModel, virt)
	fmt.Fprintf(&b, "- Memory: %.1f GiB\n", m.MemoryGiB)
	fmt.Fprintf(&b, "- Kernel: %s; %s\n", m.Kernel, m.OS)
	fmt.Fprintf(&b, "- Load average (1 min) at the start: %.2f\n", m.Load1)
	fmt.Fprintf(&b, "- %s", m.Go)
	for _, v := range r.Versions {
		fmt.Fprintf(&b, "; %s %s", v.Name, v.Value)
	}
	b.WriteString("\n\n")
	pin := "Nothing is pinned to a CPU."
	if r.Pinning != "" {
		pin = "The load generator's clients and servers are pinned apart (" + r.Pinning + ") so that where the scheduler " +
			"happens to put them does not swing the figures; the proxies, etcd and kube-apiserver are not pinned."
	}
	fmt.Fprintf(&b, "All processes share the %d CPUs: the client, the ten servers, the proxy under test, and the "+
		"sandbox's etcd and kube-apiserver. %s The figures compare paths on this machine; they are not what a "+
		"dedicated node would reach.\n\n", m.CPUs, pin)

	b.WriteString("## Results\n\n")
	fmt.Fprintf(&b, "Median over %d round(s), [min–max] where there are several; each round runs every path once, in "+
		"an order that rotates from round to round. Latencies are the medians of each run's percentile.\n\n", r.Config.Rounds)
	b.WriteString(r.Table())
	b.WriteString("\n")
	b.WriteString(method(r))
	b.WriteString("\n## Raw runs\n\n")
	b.WriteString(r.raw())
	if len(r.Notes) > 0 {
		b.WriteString("\n## Notes from the run\n\n")
		for _, n := range r.Notes {
			b.WriteString("- " + n + "\n")
		}
	}
	return b.String()
}

func method(r *Results) string {
	c := r.Config
	var b strings.Builder
	b.WriteString("## What is measured\n\n")
	if r.Scenario == NodePort {
		b.WriteString(nodePortTopology(c))
	} else {
		b.WriteString(clusterIPTopology(c))
	}
	fmt.Fprintf(&b, "- New connections/s: %d workers, each in a loop: connect, send 64 bytes, read the 64-byte answer, read the "+
		"server's FIN, close (the server closes first, so the client never runs out of ports). %s warm-up, then %s counted; "+
		"a request that fails (any error, or no answer within %s) counts as failed.\n", c.Workers, c.RateWarmup, c.RateDuration, c.RequestTimeout)
	fmt.Fprintf(&b, "- Latency on a new connection: the same request, one at a time (%s warm-up, %s); on an established "+
		"connection: 64-byte request/answer back to back on one connection (%s warm-up, %s). Go clients (`test/loadgen`), "+
		"timed around the whole request.\n", c.LatencyWarmup, c.LatencyDuration, c.LatencyWarmup, c.LatencyDuration)
	judged, floor := "is judged against the 3% target", "the direct client in a cgroup without kpr's programs"
	if r.Scenario == NodePort {
		judged, floor = "is reported", "the direct client's packets go straight to node2, never through node1"
	}
	if c.Slice != "" {
		fmt.Fprintf(&b, "- Paired comparison with the direct path: inside each kpr run, after kpr has synced, %d pairs of a kpr "+
			"sample and a direct sample (%s: the floor), taken together: for each measurement both clients run at once, "+
			"gated (`loadgen --gate`), and take turns in slices of %s, the order alternating from one couple of slices to "+
			"the next (kpr, direct, direct, kpr, ...; direct first in even pairs), warm-up included. Each client counts the "+
			"requests it began in its own slices over their time. Each pair gives kpr's figure over direct's; the median "+
			"over all pairs at a scale, with a 95%% confidence interval from the order statistics, %s. Two runs of the same "+
			"path a minute apart differ here by more than 3%%, and samples taken seconds apart still by a few percent; "+
			"slices a fraction of a second apart share the machine's state. kpr's control plane runs during both sides "+
			"of a pair, so its own CPU use (\"Proxy CPU\") weighs on both; the main table's direct row, from runs with no "+
			"proxy at all, does not have it.\n", c.Pairs, floor, c.Slice, judged)
	} else {
		fmt.Fprintf(&b, "- Paired comparison with the direct path: inside each kpr run, after kpr has synced, %d pairs of a kpr "+
			"sample and a direct sample (%s: the floor), one right after the "+
			"other, kpr first in odd pairs and direct first in even ones (going second is worth a few percent here, and the "+
			"alternation cancels it). Each pair gives kpr's figure over direct's; the median over all pairs at a scale, with a "+
			"95%% confidence interval from the order statistics, %s. Two runs of the same path a "+
			"minute apart differ here by more than 3%%; within a pair they are seconds apart. kpr's control plane runs during "+
			"both samples of a pair, so its own CPU use (\"Proxy CPU\") weighs on both; the main table's direct row, from "+
			"runs with no proxy at all, does not have it.\n", c.Pairs, floor, judged)
	}
	if r.Scenario != NodePort {
		b.WriteString("- kpr's datapath cost: with socket-level load balancing, kpr's work on a TCP connection's path is " +
			"its cgroup programs at connect() (connect4) and at the getpeername() the Go client makes after it, and its tc " +
			"program on the pods' devices (tc_nodeport_reply, for the replies of NodePort flows to local backends), which " +
			"runs for every packet entering the node from a pod and, for a packet from a port no such flow used, stops after " +
			"one array read. The benchmark keeps the kernel's BPF run-time statistics on (BPF_ENABLE_STATS, released at the " +
			"end; it adds two clock reads to each program run, which counts against kpr) and reads the run count and run time " +
			"of kpr's attached programs around each kpr slice (or, in results without slices, before and after each kpr " +
			"connection-rate measurement). Their run time per connection " +
			"(connect4 runs once per connection) is set against the CPU time the whole machine spent per connection in the " +
			"paired direct measurement (user, system, irq and softirq time of all CPUs from /proc/stat over the connections " +
			"made). Unlike the throughput ratio, this figure does not move with " +
			"the scheduler's noise. Not in it: the kernel's call into the cgroup hook around the program (a few tens of " +
			"nanoseconds).\n")
	}
	fmt.Fprintf(&b, "- Other work on the machine: during every measurement the benchmark adds up the CPU time of the "+
		"processes outside its sandbox (with their reaped children) and the hypervisor's steal time (\"Others' CPU\" in the "+
		"raw runs, as a share of all CPUs). A measurement during which others took more than %.0f%% is taken again, at "+
		"most %d times and within %s for the whole run, after waiting for a quiet second; the discarded ones are listed "+
		"in the raw runs, and a pair still disturbed is left out of the paired figures.\n",
		100*c.OthersLimit, c.Retakes, c.DisturbanceBudget)
	b.WriteString("- Proxy memory: VmRSS and VmHWM from /proc/<pid>/status after the first answer and after the traffic; the " +
		"table shows the largest. After the traffic kpr is made to run its hourly full sync (SIGHUP: every Service " +
		"recomputed, the maps checked against what it programmed), so VmHWM includes that peak. kpr's BPF maps are kernel memory, not in VmRSS; bpftool's memlock for them is in the raw " +
		"runs. \"Proxy CPU\" in the raw runs is the CPU time the proxy process itself used during the sample (its control " +
		"plane, e.g. periodic syncs; the datapath work happens in the kernel on behalf of the client and servers).\n")
	b.WriteString("- kube-proxy runs with `--conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 " +
		"--conntrack-tcp-timeout-close-wait=0 --oom-score-adj=0`, so it writes no global setting; its log lines about " +
		"sysctls are listed in the raw runs, and the root namespace is compared before and after the run (Notes).\n")
	return b.String()
}

// clusterIPTopology is the ClusterIP scenario's topology, paths and first-answer bullets.
func clusterIPTopology(c ConfigSummary) string {
	var b strings.Builder
	fmt.Fprintf(&b, "- Topology: one sandbox node (network namespaces, test/sandbox) with 10 backend pods running `loadgen serve` "+
		"and one client pod. The measured Service has the 10 pods as endpoints (port %d -> %d). At the larger scale the "+
		"other Services have %d endpoints each, at unique pod-CIDR addresses nothing answers on; they are programmed, never "+
		"connected to. All Services are single-stack IPv4 ClusterIPs.\n", servicePort, backendPort, c.EndpointsPerService)
	b.WriteString("- Paths: **direct**: the client connects to the 10 pod IPs in turn, no proxy runs, the node's ruleset is empty " +
		"(the floor). **kpr**: `kpr run` on the node, the client in kpr's cgroup. **kube-proxy nftables / iptables**: upstream " +
		"kube-proxy in the node's namespace with the node's kubelet.conf. The clients of direct and kube-proxy run in a cgroup " +
		"beside kpr's with no program attached (the same cgroup depth as kpr's client, without kpr). One proxy at a " +
		"time; in between, `kpr cleanup`, `kube-proxy --cleanup`, `nft flush ruleset` in the node namespace (checked empty), " +
		"no program left on kpr's cgroup, conntrack flushed.\n")
	fmt.Fprintf(&b, "- First answer after start: a poller in the client pod opens a new connection to the ClusterIP every %s "+
		"(each given %s) from before the proxy starts; the figure is from starting the proxy process to the first answer. "+
		"kpr starts from an empty pin directory (`kpr cleanup` first) with every Service already in the API. The wait is "+
		"capped (kpr %s, kube-proxy %s); a path that does not answer in time is reported so and not retried at that scale.\n",
		pollInterval, pollAttemptTimeout, c.KprFirstAnswerLimit, c.KubeProxyFirstAnswerLimit)
	return b.String()
}

// nodePortTopology is the NodePort scenario's topology, paths and first-answer bullets.
func nodePortTopology(c ConfigSummary) string {
	var b strings.Builder
	fmt.Fprintf(&b, "- Topology: two sandbox nodes and a host outside the cluster on their LAN (network namespaces, test/sandbox: "+
		"veths into one bridge). node2 has 10 backend pods running `loadgen serve`; the measured NodePort Service "+
		"(externalTrafficPolicy Cluster, port %d -> %d) has them as endpoints. The client on the host connects to node1's "+
		"address and the NodePort, so node1 forwards every request to a pod on node2 and the answer back to the host, out "+
		"of the device it came in on, with SNAT to its own address (the load-balancer case, where XDP can do the whole job). "+
		"The LAN behaves like a wire for every path alike: TX checksum offload is off on the host's and the nodes' LAN "+
		"devices, so frames carry complete checksums as a NIC delivers them, and the bridge's end of node1's veth runs an "+
		"XDP_PASS program, which a veth needs before it delivers what node1's XDP program sends back with XDP_TX.\n",
		servicePort, backendPort)
	b.WriteString("- Paths: **direct**: the host connects to the 10 pod IPs in turn, routed straight to node2; node1 is not on the " +
		"way and no proxy runs (the floor). **kpr tc**: `kpr run` on node1 with the defaults (tc programs on eth0, SNAT, " +
		"Maglev). **kpr XDP**: the same with `acceleration: native` (the run fails unless `kpr status` shows XDP native on " +
		"eth0; the raw runs show how many packets XDP sent). **kube-proxy nftables / iptables**: upstream kube-proxy in " +
		"node1's namespace with its kubelet.conf (DNAT and masquerade in netfilter, conntrack). Every path but direct adds " +
		"node1's hop. One proxy at a time; in between, `kpr cleanup` (no XDP program left on eth0, no pin directory), " +
		"`kube-proxy --cleanup`, `nft flush ruleset` in node1's namespace (checked empty), conntrack flushed.\n")
	fmt.Fprintf(&b, "- First answer after start: a poller on the host opens a new connection to the NodePort every %s "+
		"(each given %s) from before the proxy starts; the figure is from starting the proxy process to the first answer. "+
		"kpr starts from an empty pin directory. The wait is capped (kpr %s, kube-proxy %s).\n",
		pollInterval, pollAttemptTimeout, c.KprFirstAnswerLimit, c.KubeProxyFirstAnswerLimit)
	return b.String()
}

func (r *Results) raw() string {
	var b strings.Builder
	b.WriteString("| Services | Path | Round (position) | Load1 before | First answer | kpr synced | Client | Others' CPU | Proxy CPU | New conn/s | Failed (errors) | Backends answering | New-conn p50 / p90 / p99 / max µs | Established p50 / p90 / p99 / max µs | VmRSS / VmHWM after start | after traffic | Other |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	lat := func(x *report.Run) string {
		if x == nil {
			return "–"
		}
		l := x.Latency
		return fmt.Sprintf("%s / %s / %s / %s", fmtNum(l.P50, 0), fmtNum(l.P90, 0), fmtNum(l.P99, 0), fmtNum(l.Max, 0))
	}
	mem := func(m Mem) string {
		if m.RSS == 0 {
			return "–"
		}
		return fmtMiB(m.RSS) + " / " + fmtMiB(m.HWM)
	}
	for _, sr := range r.Scales {
		for _, pr := range sr.Paths {
			for _, run := range pr.Runs {
				synced := "–"
				if run.SyncedSeconds > 0 {
					synced = fmtSeconds(run.SyncedSeconds)
				}
				var other []string
				if run.ForeignNetns > 0 {
					other = append(other, fmt.Sprintf("%d other network namespaces on the machine", run.ForeignNetns))
				}
				if run.Programmed != "" {
					other = append(other, "kpr: "+run.Programmed)
				}
				if run.FullSync != "" {
					other = append(other, "full sync after the traffic "+run.FullSync)
				}
				if run.MapMemlock > 0 {
					other = append(other, "map memlock "+fmtMiB(run.MapMemlock))
				}
				if ns := run.NorthSouth; ns != nil {
					c := fmt.Sprintf("kpr counters: %s flows, %s packets forwarded, %s replies, %s of them by XDP",
						fmtCount(int(ns.Flows)), fmtCount(int(ns.Forwarded)), fmtCount(int(ns.Replies)), fmtCount(int(ns.XDPTx)))
					for _, name := range slices.Sorted(maps.Keys(ns.Other)) {
						c += fmt.Sprintf(", %s %s", name, fmtCount(int(ns.Other[name])))
					}
					other = append(other, c)
				}
				if run.HasNftRules {
					other = append(other, fmt.Sprintf("nftables rules in the node namespace %s", fmtCount(run.NftRules)))
				}
				if len(run.Retaken) > 0 {
					var rt []string
					for _, x := range run.Retaken {
						rt = append(rt, fmt.Sprintf("%s %s (others %.0f%%)", x.Client, x.Mode, 100*x.Others))
					}
					other = append(other, "retaken: "+strings.Join(rt, ", "))
				}
				if run.ConntrackAfterRate > 0 {
					other = append(other, fmt.Sprintf("conntrack entries after a rate run: %s", fmtCount(int(run.ConntrackAfterRate))))
				}
				notes := run.Notes
				if len(notes) > maxNotesPerRawLine {
					notes = append(slices.Clone(notes[:maxNotesPerRawLine]), fmt.Sprintf("(%d more)", len(notes)-maxNotesPerRawLine))
				}
				other = append(other, notes...)
				if run.Err != "" {
					other = append(other, "error: "+run.Err)
				}
				type row struct {
					s     *Sample
					label string
				}
				var rows []row
				for _, s := range run.Samples {
					rows = append(rows, row{s, string(s.Client)})
				}
				for i, p := range run.Pairs {
					a, b := row{p.Path, fmt.Sprintf("%s, pair %d", p.Path.Client, i+1)}, row{p.Direct, fmt.Sprintf("direct, pair %d", i+1)}
					if p.DirectFirst {
						a, b = b, a
					}
					rows = append(rows, a, b)
				}
				if len(rows) == 0 {
					rows = []row{{&Sample{}, "–"}}
				}
				for i, rw := range rows {
					s := rw.s
					head := fmt.Sprintf("| %s | %s | %d (%d) | %.2f | %s | %s", fmtCount(sr.Services), pr.Path, run.Round, run.Position, run.Load1, run.firstAnswer(), synced)
					tail := fmt.Sprintf(" %s | %s | %s |", mem(run.MemAfterSync), mem(run.MemAfterTraffic), escapeCell(strings.Join(other, "; ")))
					if i > 0 {
						head = "| | | | | |"
						tail = " | | |"
					}
					rate, backends, failed, client, others, proxy := "–", "–", "–", "–", "–", "–"
					if s.Client != "" {
						client = rw.label
						others = fmt.Sprintf("%.0f%%", 100*s.OthersCPU())
					}
					if run.Path != Direct && s.Seconds > 0 {
						proxy = fmt.Sprintf("%.2f s (%.1f%%)", s.ProxyCPUSeconds, 100*s.ProxyCPUSeconds/s.Seconds/float64(r.Machine.CPUs))
					}
					if s.Rate != nil {
						rate = fmtNum(s.Rate.PerSecond, 0)
						backends = fmt.Sprint(len(s.Rate.Backends))
					}
					if f, t := s.failed(); t > 0 {
						failed = fmtCount(int(f))
						var errs []string
						for _, x := range s.runs() {
							for k, v := range x.Errors {
								errs = append(errs, fmt.Sprintf("%s %s: %d", x.Mode, k, v))
							}
						}
						slices.Sort(errs)
						if len(errs) > 0 {
							failed += " (" + strings.Join(errs, "; ") + ")"
						}
					}
					fmt.Fprintf(&b, "%s | %s | %s | %s | %s | %s | %s | %s | %s |%s\n", head, client, others, proxy, rate, failed, backends, lat(s.Fresh), lat(s.Established), tail)
				}
			}
		}
	}
	return b.String()
}

// ReadmeSection is the README's performance section: the headline figures and a link to the
// results file.
func (r *Results) ReadmeSection(resultsFile string) string {
	var b strings.Builder
	if r.Scenario == NodePort {
		return r.nodePortReadme(resultsFile)
	}
	b.WriteString("### ClusterIP: a pod to a Service\n\n")
	fmt.Fprintf(&b, "`make bench-clusterip` (part of `make bench`) measures, on one sandbox node, a pod reaching a ClusterIP through kpr, through upstream "+
		"kube-proxy (nftables and iptables modes, the pinned version, in the same node namespace) and straight to the pods. "+
		"On a %d-CPU %s VM (kernel %s), %s, median of %d rounds:\n\n", r.Machine.CPUs, r.Machine.CPUModel, r.Machine.Kernel,
		r.Started.UTC().Format("2006-01-02"), r.Config.Rounds)
	b.WriteString("| Services | Path | First answer after start | New connections/s | Request latency p50, new / established connection | Proxy memory (VmHWM) |\n|---|---|---|---|---|---|\n")
	for _, sr := range r.Scales {
		sum := r.summaries(sr)
		for _, pr := range sr.Paths {
			s := sum[pr.Path]
			conn, lat, mem := "–", "–", "–"
			if s.ConnPerSec.N > 0 {
				conn = fmtNum(s.ConnPerSec.Median, 0)
			}
			if s.Fresh[0].N > 0 {
				lat = fmt.Sprintf("%s / %s µs", fmtNum(s.Fresh[0].Median, 0), fmtNum(s.Established[0].Median, 0))
			}
			if s.MaxHWM > 0 {
				mem = fmtMiB(s.MaxHWM)
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", fmtCount(sr.Services), pr.Path, s.firstAnswer(), conn, lat, mem)
		}
	}
	b.WriteString("\nTargets for kpr (\"within 3%\" is judged on kpr and direct samples taken in turn):\n\n")
	for _, t := range r.Targets() {
		fmt.Fprintf(&b, "- %s: %s — %s\n", t.Name, t.Measured, t.verdict())
	}
	fmt.Fprintf(&b, "\nThe machine, the command, the method and every run are in [%s](%s). The client, the servers and "+
		"the proxy share the CPUs, so the figures compare paths rather than predict a dedicated node.\n", resultsFile, resultsFile)
	return b.String()
}

// nodePortReadme is the README's NodePort part: the figures per path, the paired comparison
// with the direct path, and what kpr's XDP program did.
func (r *Results) nodePortReadme(resultsFile string) string {
	var b strings.Builder
	b.WriteString("### NodePort: a host outside the cluster to a Service\n\n")
	fmt.Fprintf(&b, "`make bench-nodeport` (part of `make bench`) measures a host on the LAN reaching a NodePort on node1 whose "+
		"10 pods are all on node2, so node1 forwards every packet back out of the device it came in on: through kpr's tc "+
		"programs, through kpr with XDP (`acceleration: native`), through upstream kube-proxy (nftables and iptables modes, "+
		"the pinned version, in node1's namespace), and straight to the pods on node2 (the floor, one hop shorter). "+
		"On a %d-CPU %s VM (kernel %s), %s, median of %d rounds:\n\n", r.Machine.CPUs, r.Machine.CPUModel, r.Machine.Kernel,
		r.Started.UTC().Format("2006-01-02"), r.Config.Rounds)
	b.WriteString("| Path | First answer after start | New connections/s | Request latency p50, new / established connection | Paired with direct: connections/s, latency p50 new / established | Machine CPU per connection | Proxy memory (VmHWM) |\n|---|---|---|---|---|---|---|\n")
	for _, sr := range r.Scales {
		sum := r.summaries(sr)
		for _, pr := range sr.Paths {
			s := sum[pr.Path]
			conn, lat, paired, cpu, mem := "–", "–", "–", "–", "–"
			if s.CPUPerConn.N > 0 {
				cpu = fmtNum(s.CPUPerConn.Median, 0) + " µs"
			}
			if s.ConnPerSec.N > 0 {
				conn = fmtNum(s.ConnPerSec.Median, 0)
			}
			if s.Fresh[0].N > 0 {
				lat = fmt.Sprintf("%s / %s µs", fmtNum(s.Fresh[0].Median, 0), fmtNum(s.Established[0].Median, 0))
			}
			if s.PairedConn.N > 0 {
				paired = fmt.Sprintf("%.1f%%, %.1f%% / %.1f%% of direct", 100*s.PairedConn.Median, 100*s.PairedFresh[0].Median, 100*s.PairedEstablished[0].Median)
			}
			if s.MaxHWM > 0 {
				mem = fmtMiB(s.MaxHWM)
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s |\n", pr.Path, s.firstAnswer(), conn, lat, paired, cpu, mem)
		}
	}
	if line := r.xdpShare(); line != "" {
		b.WriteString("\n" + line + "\n")
	}
	b.WriteString("\n")
	for _, t := range r.Targets() {
		fmt.Fprintf(&b, "- %s: %s — %s\n", t.Name, t.Measured, t.verdict())
	}
	fmt.Fprintf(&b, "\nThe machine, the command, the method and every run are in [%s](%s).\n", resultsFile, resultsFile)
	return b.String()
}

// xdpShare says which share of the packets kpr forwarded its XDP program sent, over the XDP
// runs; empty without such runs.
func (r *Results) xdpShare() string {
	var xdp, all uint64
	runs := 0
	for _, sr := range r.Scales {
		for _, pr := range sr.Paths {
			if pr.Path != KprXDP {
				continue
			}
			for _, run := range pr.Runs {
				if ns := run.NorthSouth; ns != nil {
					xdp += ns.XDPTx
					all += ns.Forwarded + ns.Replies
					runs++
				}
			}
		}
	}
	if all == 0 {
		return ""
	}
	return fmt.Sprintf("In the kpr XDP runs, the XDP program sent %s of the %s packets kpr forwarded or reverse-translated (%.2f%%, %d run(s)); tc did the rest.",
		fmtCount(int(xdp)), fmtCount(int(all)), 100*float64(xdp)/float64(all), runs)
}

func escapeCell(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// fmtCount writes an integer with thousands separators.
func fmtCount(n int) string {
	s := fmt.Sprint(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// fmtNum writes v with the given decimals and thousands separators.
func fmtNum(v float64, decimals int) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	p := math.Pow(10, float64(decimals))
	v = math.Round(v*p) / p
	whole := int(math.Trunc(v))
	out := fmtCount(whole)
	if whole == 0 && v < 0 {
		out = "-0"
	}
	if decimals > 0 {
		frac := math.Abs(v - math.Trunc(v))
		out += strings.TrimPrefix(fmt.Sprintf("%.*f", decimals, frac), "0")
	}
	return out
}

func fmtSeconds(s float64) string {
	if s < 10 {
		return fmt.Sprintf("%.2f s", s)
	}
	return fmt.Sprintf("%.1f s", s)
}

func fmtDuration(d time.Duration) string {
	switch {
	case d >= time.Minute && d%time.Minute == 0:
		return fmt.Sprintf("%d min", int(d/time.Minute))
	case d%time.Second == 0:
		return fmt.Sprintf("%d s", int(d/time.Second))
	}
	return d.String()
}

func fmtMiB(b int64) string {
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}
