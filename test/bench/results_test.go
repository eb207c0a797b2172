package bench

import (
	"maps"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/test/loadgen/report"
)

// These tests are pure: no namespace, no process, no network. The benchmark itself runs
// through `make bench`.

func TestStatOf(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want Stat
	}{
		{nil, Stat{}},
		{[]float64{3}, Stat{N: 1, Median: 3, Min: 3, Max: 3, CILo: 3, CIHi: 3}},
		{[]float64{5, 1, 3}, Stat{N: 3, Median: 3, Min: 1, Max: 5, CILo: 1, CIHi: 5}},
		{[]float64{4, 1, 3, 2}, Stat{N: 4, Median: 2.5, Min: 1, Max: 4, CILo: 1, CIHi: 4}},
	} {
		if got := statOf(tc.in); got != tc.want {
			t.Errorf("statOf(%v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

func TestMedianCI(t *testing.T) {
	// The usual table of 1-based ranks, minus one: n=9 -> 2nd and 8th, n=12 -> 3rd and 10th,
	// n=15 -> 4th and 12th, n=20 -> 6th and 15th; up to n=8 the extremes.
	for n, want := range map[int]int{1: 0, 5: 0, 6: 0, 8: 0, 9: 1, 11: 1, 12: 2, 15: 3, 20: 5} {
		if got := medianCIRank(n); got != want {
			t.Errorf("medianCIRank(%d) = %d, want %d", n, got, want)
		}
	}
	s := statOf([]float64{9, 1, 8, 2, 7, 3, 6, 4, 5})
	if s.Median != 5 || s.CILo != 2 || s.CIHi != 8 {
		t.Fatalf("statOf(1..9) = %+v, want median 5 in [2, 8]", s)
	}
}

func TestRotate(t *testing.T) {
	got := rotate(AllPaths, 5)
	want := []Path{Kpr, KubeProxyNFTables, KubeProxyIPTables, Direct}
	if strings.Join(pathStrings(got), ",") != strings.Join(pathStrings(want), ",") {
		t.Fatalf("rotate by 5 = %v, want %v", got, want)
	}
}

func pathStrings(ps []Path) []string {
	var out []string
	for _, p := range ps {
		out = append(out, string(p))
	}
	return out
}

func TestFillEndpointsAreUniqueAndOutsideNode1(t *testing.T) {
	const services, per = 10000, 10
	node1 := netip.MustParsePrefix("10.244.1.0/24")
	pods := netip.MustParsePrefix("10.244.0.0/16")
	seen := map[netip.AddrPort]bool{}
	for i := 1; i < services; i++ {
		var port int32
		for j := range per {
			a, p := fillEndpoint(i, j, per)
			if j > 0 && p != port {
				t.Fatalf("Service %d: endpoints on ports %d and %d; one slice has one port", i, port, p)
			}
			port = p
			if !pods.Contains(a) || node1.Contains(a) {
				t.Fatalf("Service %d endpoint %d: %s, want in %s outside %s", i, j, a, pods, node1)
			}
			ap := netip.AddrPortFrom(a, uint16(p))
			if seen[ap] {
				t.Fatalf("Service %d endpoint %d: %s used twice", i, j, ap)
			}
			seen[ap] = true
		}
	}
}

func TestParseStatus(t *testing.T) {
	m, err := parseStatus([]byte("Name:\tkpr\nVmPeak:\t  900 kB\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"))
	if err != nil || m.RSS != 100<<20 || m.HWM != 200<<20 {
		t.Fatalf("parseStatus = %+v, %v", m, err)
	}
	if _, err := parseStatus([]byte("Name:\tkthread\n")); err == nil {
		t.Fatal("no VmRSS: want an error")
	}
}

func TestLastReport(t *testing.T) {
	r, err := lastReport([]byte("polling\n{\"mode\":\"first\",\"ok\":0}\nnoise\n{\"mode\":\"first\",\"ok\":1,\"first_ok_unix_nano\":5}\n"))
	if err != nil || r.OK != 1 || r.FirstOKUnixNano != 5 {
		t.Fatalf("lastReport = %+v, %v", r, err)
	}
	if _, err := lastReport([]byte("polling\n")); err == nil {
		t.Fatal("no JSON line: want an error")
	}
}

func TestGlobalStateLines(t *testing.T) {
	log := `I1122 11:15:57.1 1 flags.go:64] FLAG: --oom-score-adj="0"
I1122 11:15:57.2 1 proxier.go:242] "Changed sysctl" name="net/ipv4/conf/all/route_localnet" before=0 after=1
I1122 11:15:57.3 1 proxier.go:242] "Changed sysctl" name="net/ipv4/conf/all/route_localnet" before=0 after=1
I1122 11:15:57.4 1 proxier.go:1088] "SyncProxyRules complete"
`
	path := filepath.Join(t.TempDir(), "kube-proxy.log")
	if err := os.WriteFile(path, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	got := globalStateLines(path)
	if len(got) != 1 || !strings.Contains(got[0], "route_localnet") || !strings.Contains(got[0], "node namespace") {
		t.Fatalf("globalStateLines = %q, want the one sysctl line, once", got)
	}
}

func TestFormat(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{fmtCount(0), "0"},
		{fmtCount(999), "999"},
		{fmtCount(10000), "10,000"},
		{fmtCount(-1234567), "-1,234,567"},
		{fmtNum(8312.6, 0), "8,313"},
		{fmtNum(0.745, 2), "0.75"},
		{fmtSeconds(0.7449), "0.74 s"},
		{fmtSeconds(13.04), "13.0 s"},
		{fmtDuration(3 * time.Minute), "3 min"},
		{fmtDuration(2 * time.Second), "2 s"},
		{fmtMiB(150 << 20), "150.0 MiB"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func rateRun(perSec float64, failed int64) *report.Run {
	return &report.Run{Mode: "rate", OK: int64(perSec * 4), Failed: failed, PerSecond: perSec, Seconds: 4}
}

func latRun(mode string, p50 float64) *report.Run {
	return &report.Run{Mode: mode, OK: 1000, Latency: report.Latency{N: 1000, P50: p50, P90: p50 * 1.2, P99: p50 * 1.5}}
}

func sample(client Path, perSec, fresh, est float64) *Sample {
	return &Sample{Client: client, Rate: rateRun(perSec, 0), Fresh: latRun("fresh", fresh), Established: latRun("established", est), Seconds: 10}
}

// synthetic is a run at two scales: kpr pairs 1% slower than direct at 1 Service, and at
// 10,000 Services one pair disturbed by others (left out) and kpr within the targets.
func synthetic() *Results {
	kpr1 := &PathRun{Path: Kpr, Round: 1, HasFirstAnswer: true, Answered: true, FirstAnswer: 150 * time.Millisecond,
		FirstAnswerLimit: time.Minute, MemAfterSync: Mem{RSS: 30 << 20, HWM: 31 << 20},
		Pairs: []*Pair{
			{sample(Kpr, 990, 101, 30), sample(Direct, 1000, 100, 30), false, 0.25},
			{sample(Kpr, 990, 101, 30), sample(Direct, 1000, 100, 30), true, 0.25},
		},
		ControlPairs: []*Pair{
			{sample(DirectControl, 1020, 100, 30), sample(Direct, 1000, 100, 30), false, 0.25},
			{sample(DirectControl, 980, 100, 30), sample(Direct, 1000, 100, 30), true, 0.25},
		}}
	disturbed := sample(Direct, 2000, 50, 15)
	disturbed.RateOthers, disturbed.FreshOthers, disturbed.EstablishedOthers = 0.5, 0.5, 0.5
	kpr10k := &PathRun{Path: Kpr, Round: 1, HasFirstAnswer: true, Answered: true, FirstAnswer: 800 * time.Millisecond,
		FirstAnswerLimit: time.Minute, MemAfterSync: Mem{RSS: 100 << 20, HWM: 120 << 20},
		Pairs: []*Pair{
			{sample(Kpr, 1000, 100, 30), sample(Direct, 1000, 100, 30), false, 0.25},
			{sample(Kpr, 1000, 100, 30), disturbed, true, 0.25},
		}}
	ipt10k := &PathRun{Path: KubeProxyIPTables, Round: 1, HasFirstAnswer: true, Answered: false, FirstAnswerLimit: 3 * time.Minute}
	return &Results{
		Command: "make bench",
		Machine: Machine{CPUs: 2, CPUModel: "Test CPU", Kernel: "6.18"},
		Config:  ConfigSummary{Rounds: 1, Pairs: 2, OthersLimit: 0.05, CreateParallelism: 8},
		Started: time.Unix(0, 0), Finished: time.Unix(600, 0),
		Scales: []*ScaleResult{
			{Services: 1, Paths: []*PathResult{
				{Path: Direct, Runs: []*PathRun{{Path: Direct, Round: 1, Samples: []*Sample{sample(Direct, 1010, 99, 30)}}}},
				{Path: Kpr, Runs: []*PathRun{kpr1}},
			}},
			{Services: 10000, Created: 9999, CreateSeconds: 60, Paths: []*PathResult{
				{Path: Direct, Runs: []*PathRun{{Path: Direct, Round: 1, Samples: []*Sample{sample(Direct, 1000, 100, 30)}}}},
				{Path: Kpr, Runs: []*PathRun{kpr10k}},
				{Path: KubeProxyIPTables, Runs: []*PathRun{ipt10k}, Skipped: "did not answer within 3 min in round 1; not retried"},
			}},
		},
	}
}

func TestSummarizePairs(t *testing.T) {
	r := synthetic()
	k := r.summaries(r.Scales[0])[Kpr]
	if k.Pairs != 2 || k.PairedConn.N != 2 || k.PairedConn.Median != 0.99 {
		t.Fatalf("1 Service: pairs %d, paired conn %+v, want 2 pairs at 0.99", k.Pairs, k.PairedConn)
	}
	if c := k.ControlConn; c.N != 2 || math.Abs(c.Median-1) > 1e-9 {
		t.Fatalf("1 Service: control %+v, want 2 pairs at 1.00 (1.02 and 0.98)", c)
	}
	if c := r.summaries(r.Scales[1])[Kpr].ControlConn; c.N != 0 {
		t.Fatalf("10,000 Services: control %+v, want none", c)
	}
	if md := r.Markdown(); !strings.Contains(md, "Control: in the same runs, 2 pairs") || !strings.Contains(md, "new connections/s 100.0% [98.0–102.0] of the other side") {
		t.Errorf("the results file lacks the control line:\n%s", md)
	}
	if k.ConnPerSec.Median != 990 || k.Fresh[0].Median != 101 || k.PairedDirectConn.Median != 1000 {
		t.Fatalf("kpr's own figures: %+v %+v", k.ConnPerSec, k.Fresh[0])
	}
	k = r.summaries(r.Scales[1])[Kpr]
	if k.DisturbedPairs != 1 || k.PairedConn.N != 1 || k.PairedConn.Median != 1 {
		t.Fatalf("10,000: disturbed %d, paired conn %+v, want the undisturbed pair only", k.DisturbedPairs, k.PairedConn)
	}
}

func TestTargets(t *testing.T) {
	verdicts := map[string]string{}
	for _, tg := range synthetic().Targets() {
		verdicts[tg.Name] = tg.verdict()
	}
	for name, want := range map[string]string{
		"kpr new connections/s ≥ 97% of direct, 1 Service":                                        "met",
		"kpr request latency on a new connection, p50 ≤ 103% of direct, 10,000 Services":          "met",
		"no failed connection through kpr (all scales, all runs)":                                 "met",
		"10,000 Services answer within 2 s of kpr's start":                                        "met",
		"kpr resident memory (VmHWM) under 150.0 MiB with 10,000 Services":                        "met",
		"kpr request latency on an established connection, p50 ≤ 103% of direct, 1 Service":       "met",
		"kpr request latency on an established connection, p50 ≤ 103% of direct, 10,000 Services": "met",
		"kpr new connections/s ≥ 97% of direct, 10,000 Services":                                  "met",
	} {
		if got, ok := verdicts[name]; !ok || got != want {
			t.Errorf("%s: %q (present %v), want %q; all: %v", name, got, ok, want, verdicts)
		}
	}

	r := synthetic()
	r.Scales[1].Paths[1].Runs[0].MemAfterTraffic = Mem{RSS: 160 << 20, HWM: 170 << 20}
	r.Scales[1].Paths[1].Runs[0].FirstAnswer = 2500 * time.Millisecond
	r.Scales[0].Paths[1].Runs[0].Pairs[1].Path.Rate.Failed = 3
	for _, tg := range r.Targets() {
		switch {
		case strings.HasPrefix(tg.Name, "kpr resident memory"), strings.HasPrefix(tg.Name, "10,000 Services answer"), strings.HasPrefix(tg.Name, "no failed"):
			if tg.verdict() != "**MISSED**" {
				t.Errorf("%s: %s (%s), want missed", tg.Name, tg.verdict(), tg.Measured)
			}
		}
	}
}

func TestMarkdown(t *testing.T) {
	r := synthetic()
	md := r.Markdown()
	for _, want := range []string{
		"## Machine", "2 × Test CPU", "## Command", "make bench", "### 10,000 Services",
		"> 3 min (did not answer)", "Creating 9,999 Services", "## Raw runs", "kpr against the direct path, paired",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("the results file lacks %q", want)
		}
	}
	for _, line := range strings.Split(md, "\n") {
		if strings.HasPrefix(line, "| 10,000 | kpr |") || strings.HasPrefix(line, "| 1 | direct |") {
			if n := strings.Count(line, "|") - strings.Count(line, `\|`) - 1; n != 17 {
				t.Errorf("raw row has %d cells, want 17: %s", n, line)
			}
		}
	}
	readme := r.ReadmeSection("docs/bench/clusterip.md")
	if !strings.HasPrefix(readme, "### ClusterIP") || !strings.Contains(readme, "(docs/bench/clusterip.md)") {
		t.Errorf("README section:\n%s", readme)
	}
}

// TestNodePortReport: the NodePort results name their paths, compare each kpr path with the
// direct samples taken beside it, say how much XDP sent, and judge only failed requests.
func TestNodePortReport(t *testing.T) {
	run := func(p Path, perSec float64, ns *NorthSouthCounters, failed int64) *PathRun {
		own := sample(p, perSec, 100, 30)
		own.Rate.Failed = failed
		own.RateBusySeconds, own.RateSpanSeconds = 2*4*perSec/1000, 4 // 2 ms of CPU per connection
		own.RateBPF = &BPFRun{Runs: uint64(10 * 4 * perSec), Nanos: uint64(10 * 4 * perSec * 150)}
		return &PathRun{Path: p, Round: 1, HasFirstAnswer: true, Answered: true, FirstAnswer: 300 * time.Millisecond,
			FirstAnswerLimit: time.Minute, NorthSouth: ns, MemAfterSync: Mem{RSS: 30 << 20, HWM: 31 << 20},
			Pairs: []*Pair{{own, sample(Direct, 1000, 80, 25), false, 0.25}}}
	}
	r := &Results{
		Scenario: NodePort,
		Command:  "make bench-nodeport",
		Machine:  Machine{CPUs: 2, CPUModel: "Test CPU", Kernel: "6.18"},
		Config:   ConfigSummary{Rounds: 1, Pairs: 1, OthersLimit: 0.05},
		Started:  time.Unix(0, 0), Finished: time.Unix(600, 0),
		Scales: []*ScaleResult{{Services: 1, Paths: []*PathResult{
			{Path: Direct, Runs: []*PathRun{{Path: Direct, Round: 1, Samples: []*Sample{sample(Direct, 1000, 80, 25)}}}},
			{Path: KprTC, Runs: []*PathRun{run(KprTC, 800, &NorthSouthCounters{Flows: 10, Forwarded: 50, Replies: 50}, 0)}},
			{Path: KprXDP, Runs: []*PathRun{run(KprXDP, 900, &NorthSouthCounters{Flows: 10, Forwarded: 50, Replies: 50, XDPTx: 99,
				Other: map[string]uint64{"PassFIB": 1, "DropNoSNATPort": 2}}, 2)}},
		}}},
	}
	md := r.Markdown()
	for _, want := range []string{
		"# NodePort benchmark", "kpr tc against the direct path, paired", "kpr XDP against the direct path, paired",
		"the XDP program sent 99 of the 100 packets", "host outside the cluster", "kpr counters: 10 flows",
		"99 of them by XDP, DropNoSNATPort 2, PassFIB 1",
		"kpr XDP 2,000 µs", "kpr XDP's programs, from the kernel's BPF run-time statistics", "150 ns per program run", "10.0 runs per new connection",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("the results file lacks %q", want)
		}
	}
	if strings.Contains(md, "connect4") || strings.Contains(md, "3% target") {
		t.Errorf("the NodePort results describe the ClusterIP method:\n%s", md)
	}
	targets := r.Targets()
	if len(targets) != 2 || targets[0].Met == nil || !*targets[0].Met || targets[1].Met == nil || *targets[1].Met {
		t.Errorf("targets: want tc met (no failure) and XDP missed (2 failed): %+v", targets)
	}
	readme := r.ReadmeSection("docs/bench/nodeport.md")
	for _, want := range []string{"### NodePort", "| kpr XDP | 0.30 s | 900 |", "90.0%, 125.0% / 120.0% of direct | 2,000 µs", "(docs/bench/nodeport.md)"} {
		if !strings.Contains(readme, want) {
			t.Errorf("README part lacks %q:\n%s", want, readme)
		}
	}
}

func TestConfigs(t *testing.T) {
	np := DefaultNodePortConfig()
	for name, c := range map[string]Config{"default": DefaultConfig(), "quick": QuickConfig(), "nodeport": np, "nodeport quick": Quick(np)} {
		c.WorkDir = t.TempDir()
		if err := c.Validate(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	c := DefaultConfig()
	c.Scales = []int{10000, 1}
	c.Rounds = 0
	err := c.Validate()
	for _, want := range []string{"ascending", "rounds", "work dir"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want it to name %q", err, want)
		}
	}
	np.WorkDir = t.TempDir()
	np.Scales = []int{1, 10000}
	np.Paths = append(np.Paths, Kpr)
	err = np.Validate()
	for _, want := range []string{"measures 1 Service", `"kpr" is not a path of the nodeport scenario`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("NodePort Validate() = %v, want it to name %q", err, want)
		}
	}
}

func TestDatapathCost(t *testing.T) {
	r := synthetic()
	// 1 Service: kpr's programs ran 3 times per connection (connect4 once) for 300 ns in all;
	// the direct sample made 1000 conn/s for 2 s with 0.4 s of busy CPU: 200 µs a connection.
	for _, p := range r.Scales[0].Paths[1].Runs[0].Pairs {
		p.Path.RateBPF = &BPFRun{Runs: 3000, Nanos: 300_000, ByProgram: map[string][2]uint64{
			"connect4": {1000, 200_000}, "getpeername4": {2000, 100_000}}}
		p.Direct.RateBusySeconds, p.Direct.RateSpanSeconds = 0.4, 2
	}
	k := r.summaries(r.Scales[0])[Kpr]
	if k.BPFShare.N != 2 || k.BPFNanosPerConn.Median != 300 || k.BPFRunsPerConn.Median != 3 || k.DirectCPUPerConn.Median != 200 {
		t.Fatalf("cost %+v runs %+v direct %+v", k.BPFNanosPerConn, k.BPFRunsPerConn, k.DirectCPUPerConn)
	}
	if got := k.BPFShare.Median; got < 0.0014999 || got > 0.0015001 {
		t.Fatalf("share %v, want 300 ns of 200 µs = 0.15%%", got)
	}
	verdict := func(r *Results) string {
		for _, tg := range r.Targets() {
			if strings.HasPrefix(tg.Name, "kpr's BPF programs") && strings.HasSuffix(tg.Name, ", 1 Service") {
				return tg.verdict()
			}
		}
		return "absent"
	}
	if v := verdict(r); v != "met" {
		t.Fatalf("0.15%%: %s", v)
	}
	if !strings.Contains(r.Markdown(), "kpr's datapath cost, from the kernel's BPF run-time statistics") {
		t.Error("the results file lacks the datapath cost")
	}
	// 10 µs a connection is 5% of 200 µs.
	for _, p := range r.Scales[0].Paths[1].Runs[0].Pairs {
		p.Path.RateBPF.Nanos = 10_000_000
	}
	if v := verdict(r); v != "**MISSED**" {
		t.Fatalf("5%%: %s", v)
	}
	// Without statistics, nothing is claimed.
	for _, p := range r.Scales[0].Paths[1].Runs[0].Pairs {
		p.Path.RateBPF = nil
	}
	if v := verdict(r); v != "not measured" {
		t.Fatalf("no statistics: %s", v)
	}
}

func TestNftTarget(t *testing.T) {
	scale := func(n int, kpr, nft []int) *ScaleResult {
		sr := &ScaleResult{Services: n}
		for _, p := range []struct {
			path   Path
			counts []int
		}{{Kpr, kpr}, {KubeProxyNFTables, nft}} {
			pr := &PathResult{Path: p.path}
			for _, c := range p.counts {
				pr.Runs = append(pr.Runs, &PathRun{NftRules: c, HasNftRules: true})
			}
			sr.Paths = append(sr.Paths, pr)
		}
		return sr
	}
	for _, tc := range []struct {
		name   string
		scales []*ScaleResult
		want   string
	}{
		{"the same at both scales", []*ScaleResult{scale(1, []int{10, 10}, []int{40}), scale(10000, []int{10}, []int{100030})}, "met"},
		{"grows", []*ScaleResult{scale(1, []int{10}, nil), scale(10000, []int{11}, nil)}, "**MISSED**"},
		{"one scale proves nothing", []*ScaleResult{scale(1, []int{10}, nil)}, "not measured"},
	} {
		r := &Results{Scales: tc.scales}
		got := r.nftTarget()
		if got.verdict() != tc.want {
			t.Errorf("%s: verdict %q (%s), want %q", tc.name, got.verdict(), got.Measured, tc.want)
		}
	}
	r := &Results{Scales: []*ScaleResult{scale(1, []int{10}, []int{40}), scale(10000, []int{10}, []int{100030})}}
	if m := r.nftTarget().Measured; !strings.Contains(m, "kpr at 10,000 Services: 10") || !strings.Contains(m, "kube-proxy nftables at 10,000 Services: 100,030") {
		t.Errorf("measured %q names neither count per path and scale", m)
	}
}

func TestOtherCounters(t *testing.T) {
	if got := otherCounters(bpf.NodePortStats{NewFlows: 5, Forwarded: 9, Replies: 9, XDPTx: 3}); got != nil {
		t.Errorf("otherCounters of flows, forwarded, replies and XDP_TX only = %v, want none", got)
	}
	got := otherCounters(bpf.NodePortStats{NewFlows: 5, DropNoSNATPort: 2, PassFIB: 1})
	if want := map[string]uint64{"DropNoSNATPort": 2, "PassFIB": 1}; !maps.Equal(got, want) {
		t.Errorf("otherCounters = %v, want %v", got, want)
	}
}
