package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kpr-dev/kpr/test/sandbox"
)

// env is one sandbox cluster with one node running kpr, shared by the subtests of a test.
type env struct {
	t     *testing.T
	cp    *sandbox.ControlPlane
	node  *sandbox.Node
	kpr   *sandbox.Kpr
	probe string
}

// requireE2E skips unless the machine can run end-to-end tests; with KPR_E2E=1 (make test)
// a missing prerequisite is a failure instead.
func requireE2E(t *testing.T) {
	t.Helper()
	strict := os.Getenv("KPR_E2E") == "1"
	fail := func(why string) {
		if strict {
			t.Fatalf("KPR_E2E=1 but %s", why)
		}
		t.Skip(why)
	}
	if os.Geteuid() != 0 {
		fail("end-to-end tests need root")
	}
	if _, ok := sandbox.K8sBinDir(); !ok {
		fail("no kube-apiserver binary (run hack/k8s.sh bins, or make e2e)")
	}
}

// startSandbox starts the sandbox cluster in work/sandbox with t's log (o's WorkDir and Log
// are set here) and closes it when the test ends.
func startSandbox(ctx context.Context, t *testing.T, work string, o sandbox.Options) *sandbox.ControlPlane {
	t.Helper()
	o.WorkDir, o.Log = filepath.Join(work, "sandbox"), t.Logf
	cp, err := sandbox.Start(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cp.Close(); err != nil {
			t.Errorf("sandbox close: %v", err)
		}
	})
	return cp
}

// newEnv starts the control plane and one node, builds kpr and the probe, and prepares kpr's
// own cgroup and bpffs on the node. Everything is removed in t.Cleanup, in reverse order.
func newEnv(t *testing.T, ctx context.Context) *env {
	requireE2E(t)
	e := &env{t: t}
	work := t.TempDir()
	var err error
	e.cp = startSandbox(ctx, t, work, sandbox.Options{})
	if e.node, err = e.cp.AddNode(ctx, "node1", 1); err != nil {
		t.Fatal(err)
	}
	if e.probe, err = sandbox.BuildProbe(work); err != nil {
		t.Fatal(err)
	}
	bin, err := sandbox.BuildKpr(work)
	if err != nil {
		t.Fatal(err)
	}
	if e.kpr, err = e.node.NewKpr(bin); err != nil {
		t.Fatal(err)
	}
	// Registered last, so it runs first: kpr stops and its datapath goes before the sandbox.
	t.Cleanup(func() {
		if err := e.kpr.Close(); err != nil {
			t.Errorf("kpr: %v", err)
		}
	})
	return e
}

func (e *env) startKpr(ctx context.Context) {
	e.t.Helper()
	if err := e.kpr.Start(ctx, 30*time.Second); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) stopKpr() {
	e.t.Helper()
	if err := e.kpr.Stop(); err != nil {
		e.t.Fatal(err)
	}
}

// kprCmd runs a kpr subcommand (status, service list) in the node namespace.
func (e *env) kprCmd(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return e.kpr.Run(ctx, args...)
}

// serviceList runs `kpr service list` and returns each frontend's backend column lines.
func (e *env) serviceList(t *testing.T) map[string][]string {
	t.Helper()
	out, err := e.kprCmd("service", "list")
	if err != nil {
		t.Fatalf("kpr service list: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	got := map[string][]string{}
	var cur string
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		switch {
		case len(f) >= 5 && f[0] != "":
			cur = f[1]
			got[cur] = append(got[cur], strings.Join(f[4:], " "))
		case cur != "":
			got[cur] = append(got[cur], strings.Join(f, " "))
		}
	}
	return got
}

// result is one probe attempt (see test/probe).
type result struct {
	OK        bool    `json:"ok"`
	Backend   string  `json:"backend"`
	Errno     string  `json:"errno"`
	Err       string  `json:"err"`
	Timeout   bool    `json:"timeout"`
	Peer      string  `json:"peer"`
	SeenAs    string  `json:"seen_as"`
	ElapsedMS float64 `json:"elapsed_ms"`
}

type runner interface {
	Exec(ctx context.Context, cgroupFD int, name string, args ...string) ([]byte, error)
}

// probeFrom runs the probe client in where (a pod or the node), inside kpr's cgroup so its
// socket hooks apply, and returns one result per attempt.
func (e *env) probeFrom(where runner, args ...string) []result {
	e.t.Helper()
	rs, err := e.probeErr(where, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return rs
}

// probeErr is probeFrom for goroutines other than the test's.
func (e *env) probeErr(where runner, args ...string) ([]result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := where.Exec(ctx, e.kpr.CgroupFD, e.probe, append([]string{"client"}, args...)...)
	if err != nil {
		return nil, fmt.Errorf("probe client %v: %v\n%s", args, err, out)
	}
	return parseResults(out)
}

// parseResults reads probe client's output: one JSON result per attempt.
func parseResults(out []byte) ([]result, error) {
	var rs []result
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 || line[0] != '{' {
			continue
		}
		var r result
		if err := json.Unmarshal(line, &r); err != nil {
			return nil, fmt.Errorf("probe output %q: %v", line, err)
		}
		rs = append(rs, r)
	}
	return rs, nil
}

// eventually retries check until it succeeds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = check(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func backends(rs []result) map[string]int {
	out := map[string]int{}
	for _, r := range rs {
		if r.OK {
			out[r.Backend]++
		}
	}
	return out
}

func failures(rs []result) []string {
	var out []string
	for _, r := range rs {
		if !r.OK {
			out = append(out, strings.TrimSpace(r.Errno+" "+r.Err))
		}
	}
	return out
}
