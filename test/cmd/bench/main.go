// Command bench is `make bench`: kpr against upstream kube-proxy (nftables and iptables modes)
// and the direct path, on a sandbox cluster made of network namespaces (see package
// test/bench), in one of two scenarios:
//
//   - clusterip (the default): a pod reaching a ClusterIP, at 1 and at 10,000 Services; writes
//     docs/bench/clusterip.md (and .json).
//   - nodeport (-scenario nodeport): a host outside the cluster reaching a NodePort whose pods
//     are on another node, through kpr's tc programs and through kpr with XDP; writes
//     docs/bench/nodeport.md (and .json).
//
// It prints the results table; everything it creates is removed when it ends, also on Ctrl-C.
//
//	make bench                               both scenarios, the full runs (about 25 minutes)
//	make bench-clusterip, make bench-nodeport one of them
//	make bench BENCH_FLAGS=-quick            1 Service, one round, short windows; writes nothing
//	BENCH_SCALES=1 BENCH_ROUNDS=1 make bench-clusterip
//	                                         a subset through the environment
//	BENCH_PATHS=direct,kpr make bench-clusterip
//	                                         only some paths (direct, kpr, tc, xdp, nftables, iptables)
//	go run ./test/cmd/bench -render docs/bench/clusterip.json -readme
//	                                         rewrite the Markdown and the README section from a run's JSON
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kpr-dev/kpr/test/bench"
)

// overallTimeout bounds a whole run, whatever the flags say.
const overallTimeout = 90 * time.Minute

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	scenario := flag.String("scenario", "clusterip", "what to measure: clusterip (a pod to a ClusterIP) or nodeport (a host outside the cluster to a NodePort)")
	quick := flag.Bool("quick", false, "a short subset: 1 Service, one round, short windows; writes no file unless -out is given")
	scales := flag.String("scales", os.Getenv("BENCH_SCALES"), "comma-separated Service counts (env BENCH_SCALES; default 1,10000)")
	paths := flag.String("paths", os.Getenv("BENCH_PATHS"), "comma-separated paths: direct, kpr, nftables, iptables (env BENCH_PATHS; default all)")
	rounds := flag.Int("rounds", envInt("BENCH_ROUNDS", 0), "rounds per scale (env BENCH_ROUNDS; default 3)")
	workers := flag.Int("workers", 0, "concurrent workers of the connection-rate run (default 8)")
	duration := flag.Duration("duration", 0, "measured time of the connection-rate run (default 10s)")
	latency := flag.Duration("latency-duration", 0, "measured time of each latency run (default 5s)")
	kubeProxyLimit := flag.Duration("kube-proxy-timeout", 0, "how long kube-proxy may take to answer after its start (default 3m)")
	pairs := flag.Int("pairs", 0, "pairs of kpr and direct samples in each kpr run (default 5)")
	controlPairs := flag.Int("control-pairs", -1, "control pairs (both sides direct) in each kpr run of the ClusterIP scenario (default 2, 0 with -quick)")
	slice := flag.Duration("slice", 0, "in a pair, the kpr and direct clients take turns in slices of this (default 250ms)")
	noPin := flag.Bool("no-pin", false, "do not pin the clients and the servers to separate CPUs")
	out := flag.String("out", "", "results file (Markdown; a .json beside it); default docs/bench/clusterip.md for a full run, none with -quick")
	readme := flag.Bool("readme", false, "also rewrite the README's \"## Performance\" section")
	render := flag.String("render", "", "measure nothing: read this results JSON and write its Markdown (beside it, or -out) and, with -readme, the README section")
	kprRev := flag.String("kpr-rev", os.Getenv("BENCH_KPR_REV"), "build kpr from this git revision instead of the working tree (env BENCH_KPR_REV)")
	keep := flag.Bool("keep", false, "keep the work directory (logs of every process) after the run")
	flag.Parse()

	if *render != "" {
		return rerender(*render, *out, *readme)
	}
	sc, err := bench.ParseScenario(*scenario)
	if err != nil {
		return fmt.Errorf("-scenario: %w", err)
	}
	cfg := bench.DefaultConfig()
	if sc == bench.NodePort {
		cfg = bench.DefaultNodePortConfig()
	}
	if *quick {
		cfg = bench.Quick(cfg)
	}
	if *scales != "" {
		if cfg.Scales, err = parseInts(*scales); err != nil {
			return fmt.Errorf("-scales: %w", err)
		}
	}
	if *paths != "" {
		cfg.Paths = nil
		for _, s := range strings.Split(*paths, ",") {
			p, err := bench.ParsePath(s)
			if err != nil {
				return fmt.Errorf("-paths: %w", err)
			}
			cfg.Paths = append(cfg.Paths, p)
		}
	}
	if *rounds > 0 {
		cfg.Rounds = *rounds
	}
	if *workers > 0 {
		cfg.Workers = *workers
	}
	if *duration > 0 {
		cfg.RateDuration = *duration
	}
	if *latency > 0 {
		cfg.LatencyDuration = *latency
	}
	if *kubeProxyLimit > 0 {
		cfg.KubeProxyFirstAnswerLimit = *kubeProxyLimit
	}
	if *slice > 0 {
		cfg.Slice = *slice
	}
	if *pairs > 0 {
		cfg.Pairs = *pairs
	}
	if *controlPairs >= 0 {
		cfg.ControlPairs = *controlPairs
	}
	if *noPin {
		cfg.Pin = false
	}
	cfg.KprRev = *kprRev
	root, err := bench.ModuleRoot()
	if err != nil {
		return err
	}
	outFile := *out
	if outFile == "" && !*quick {
		outFile = filepath.Join(root, "docs", "bench", string(sc)+".md")
	}

	work, err := os.MkdirTemp("", "kpr-bench-")
	if err != nil {
		return err
	}
	cfg.WorkDir = work
	cfg.K8sBinDir = os.Getenv("KPR_K8S_BINDIR")
	started := time.Now()
	cfg.Log = func(format string, args ...any) {
		fmt.Printf("[%6.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, args...))
	}
	if err := cfg.Validate(); err != nil {
		os.RemoveAll(work)
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, overallTimeout)
	defer cancel()

	res, runErr := bench.Run(ctx, cfg)
	if res == nil {
		os.RemoveAll(work)
		return runErr
	}
	res.Command = command()

	fmt.Println()
	fmt.Print(res.Table())
	if runErr == nil && !*keep {
		os.RemoveAll(work)
	} else {
		fmt.Printf("\nlogs of every process: %s\n", filepath.Join(work, "sandbox", "logs"))
	}
	if outFile != "" && len(res.Scales) > 0 {
		if err := write(outFile, res); err != nil {
			return errors.Join(runErr, err)
		}
		fmt.Printf("\nresults: %s\n", outFile)
		if *readme {
			rel, _ := filepath.Rel(root, outFile)
			if err := updateReadme(filepath.Join(root, "README.md"), res.Scenario, res.ReadmeSection(filepath.ToSlash(rel))); err != nil {
				return errors.Join(runErr, err)
			}
			fmt.Println("README.md: performance section updated")
		}
	}
	return runErr
}

// rerender writes the Markdown of a results JSON written by an earlier run (and the README
// section), e.g. after the report's layout changed.
func rerender(jsonFile, mdFile string, readme bool) error {
	data, err := os.ReadFile(jsonFile)
	if err != nil {
		return err
	}
	var res bench.Results
	if err := json.Unmarshal(data, &res); err != nil {
		return fmt.Errorf("%s: %w", jsonFile, err)
	}
	if mdFile == "" {
		mdFile = strings.TrimSuffix(jsonFile, filepath.Ext(jsonFile)) + ".md"
	}
	fmt.Print(res.Table())
	if err := os.WriteFile(mdFile, []byte(res.Markdown()), 0o644); err != nil {
		return err
	}
	fmt.Printf("\nresults: %s\n", mdFile)
	if !readme {
		return nil
	}
	root, err := bench.ModuleRoot()
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(mdFile)
	if err != nil {
		return err
	}
	rel, _ := filepath.Rel(root, abs)
	if err := updateReadme(filepath.Join(root, "README.md"), res.Scenario, res.ReadmeSection(filepath.ToSlash(rel))); err != nil {
		return err
	}
	fmt.Println("README.md: performance section updated")
	return nil
}

func write(mdFile string, res *bench.Results) error {
	if err := os.MkdirAll(filepath.Dir(mdFile), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(mdFile, []byte(res.Markdown()), 0o644); err != nil {
		return err
	}
	js, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(strings.TrimSuffix(mdFile, filepath.Ext(mdFile))+".json", append(js, '\n'), 0o644)
}

// updateReadme puts block, the README's part for one scenario, into the "## Performance"
// section (up to the next "## "), between the markers <!-- bench:<scenario> --> and
// <!-- /bench:<scenario> -->: in place of what they held, or at the end of the section.
func updateReadme(path string, scenario bench.Scenario, block string) error {
	if scenario == "" {
		scenario = bench.ClusterIP
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(data)
	start := strings.Index(s, "\n## Performance\n")
	if start < 0 {
		return fmt.Errorf("%s: no \"## Performance\" section", path)
	}
	start++
	end := strings.Index(s[start+1:], "\n## ")
	if end < 0 {
		end = len(s)
	} else {
		end += start + 2
	}
	section := s[start:end]
	open, closing := "<!-- bench:"+string(scenario)+" -->\n", "<!-- /bench:"+string(scenario)+" -->\n"
	marked := open + strings.TrimRight(block, "\n") + "\n" + closing
	i, j := strings.Index(section, open), strings.Index(section, closing)
	switch {
	case i >= 0 && j > i:
		section = section[:i] + marked + section[j+len(closing):]
	case i >= 0 || j >= 0:
		return fmt.Errorf("%s: the %s markers of the Performance section are unbalanced", path, scenario)
	default:
		section = strings.TrimRight(section, "\n") + "\n\n" + marked + "\n"
	}
	return os.WriteFile(path, []byte(s[:start]+section+s[end:]), 0o644)
}

// command is how the run was started, for the results file: make's target when make ran it.
func command() string {
	var env []string
	for _, k := range []string{"BENCH_SCALES", "BENCH_PATHS", "BENCH_ROUNDS", "BENCH_KPR_REV"} {
		if v := os.Getenv(k); v != "" {
			env = append(env, k+"="+v)
		}
	}
	cmd := "go run ./test/cmd/bench " + strings.Join(os.Args[1:], " ")
	if os.Getenv("MAKELEVEL") != "" {
		// The Makefile's bench-<scenario> target passes -scenario <scenario> before BENCH_FLAGS.
		args := os.Args[1:]
		scenario := "clusterip"
		if len(args) >= 2 && args[0] == "-scenario" {
			scenario, args = args[1], args[2:]
		}
		cmd = "make bench-" + scenario
		if len(args) > 0 {
			cmd += " BENCH_FLAGS='" + strings.Join(args, " ") + "'"
		}
	}
	return strings.TrimSpace(strings.Join(append(env, cmd), " "))
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.ReplaceAll(strings.TrimSpace(f), "_", "")
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

func envInt(key string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(key)); err == nil {
		return v
	}
	return def
}
