package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kpr-dev/kpr/node/agent"
	"github.com/kpr-dev/kpr/test/sandbox"
)

// restartAttempts and restartInterval make each client's stream: one new socket every
// interval, each attempt given a second.
const (
	restartAttempts = 500
	restartInterval = 20 * time.Millisecond
)

// TestRestartKeepsServing: streams of new TCP connections and UDP requests through a
// ClusterIP (from node1's own processes) and through node1's NodePort (from the external
// host) while node1's kpr is stopped with SIGTERM and started, killed with SIGKILL and
// started, and replaced by a newer build: not one request fails. A bad setting at start makes
// kpr exit naming it while the datapath keeps serving. An endpoint removed while kpr is down is
// gone once it is back.
func TestRestartKeepsServing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	e := newNPEnv(t, ctx)
	defer func() {
		if t.Failed() {
			e.diagnostics()
		}
	}()
	node1, k := e.nodes[0], e.kprs[0]
	svc := e.npService(ctx, "rs", v1.ServiceTypeNodePort, nil, e.pods...)
	clusterIP := netip.MustParseAddr(svc.Spec.ClusterIP)

	type stream struct {
		name string
		dst  netip.AddrPort
		on   interface {
			StartCmd(context.Context, sandbox.Cmd) (*sandbox.Process, error)
		}
		cgroupFD int
		proto    string
		proc     *sandbox.Process
	}
	var streams []*stream
	for _, proto := range []string{"tcp", "udp"} {
		p := v1.ProtocolTCP
		if proto == "udp" {
			p = v1.ProtocolUDP
		}
		nodePort := netip.AddrPortFrom(node1.IPv4, nodePortOf(t, svc, p))
		if err := e.serveWithin(proto, nodePort, npProgramWithin); err != nil {
			t.Fatalf("%s NodePort not served: %v", proto, err)
		}
		streams = append(streams,
			&stream{name: proto + " to the ClusterIP from node1", dst: netip.AddrPortFrom(clusterIP, 80), on: node1, cgroupFD: k.CgroupFD, proto: proto},
			&stream{name: proto + " to node1's NodePort from the host", dst: nodePort, on: e.host, proto: proto})
	}
	start := func() {
		t.Helper()
		for _, s := range streams {
			var err error
			s.proc, err = s.on.StartCmd(ctx, sandbox.Cmd{Name: e.probe, CgroupFD: s.cgroupFD, Args: []string{"client",
				"--target", s.dst.String(), "--proto", s.proto, "--count", strconv.Itoa(restartAttempts),
				"--interval", restartInterval.String(), "--timeout", "1s"}})
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	check := func(during string) {
		t.Helper()
		for _, s := range streams {
			select {
			case <-s.proc.Done():
			case <-time.After(2 * time.Minute):
				t.Fatalf("%s: the client did not finish", s.name)
			}
			out, err := os.ReadFile(s.proc.LogPath)
			if err != nil {
				t.Fatal(err)
			}
			rs, err := parseResults(out)
			if err != nil {
				t.Fatal(err)
			}
			if len(rs) != restartAttempts {
				t.Errorf("%s %s: %d results, want %d", s.name, during, len(rs), restartAttempts)
			}
			if sum := summary(rs); countFailed(rs) > 0 {
				t.Errorf("%s %s: %s", s.name, during, sum)
			} else {
				t.Logf("%s %s: %s", s.name, during, sum)
			}
		}
	}
	waitRunning := func() { time.Sleep(time.Second) } // part of each stream before, part after

	newBin, err := sandbox.BuildKprAs(t.TempDir(), "kpr-next", "restart-test-next")
	if err != nil {
		t.Fatal(err)
	}
	start()
	for _, step := range []struct {
		what string
		do   func() error
	}{
		{"SIGTERM and start", func() error {
			if err := k.Stop(); err != nil {
				return err
			}
			return k.Start(ctx, 30*time.Second)
		}},
		{"SIGKILL and start", func() error {
			if err := k.Kill(); err != nil {
				return err
			}
			return k.Start(ctx, 30*time.Second)
		}},
		{"a newer build in its place", func() error {
			if err := k.Stop(); err != nil {
				return err
			}
			k.Bin = newBin
			return k.Start(ctx, 30*time.Second)
		}},
	} {
		waitRunning()
		if err := step.do(); err != nil {
			t.Fatalf("%s: %v", step.what, err)
		}
		t.Logf("kpr on node1: %s done", step.what)
	}
	// The new kpr adopted the pinned maps: its first sync found every entry as it should be.
	if log := k.Proc.LogTail(1 << 20); !regexp.MustCompile(`msg="datapath synced" full=true upserted=0 deleted=0`).MatchString(log) {
		t.Errorf("the restarted kpr rewrote entries that had not changed:\n%s", lastLinesOf(log, "datapath synced", 3))
	}
	check("while kpr was restarted three times")
	if st, err := agent.ReadStatus(k.RunDir); err != nil || st.Version != "restart-test-next" {
		t.Errorf("the running kpr is not the newer build: %+v %v", st, err)
	}

	badConfigKeepsServing(ctx, t, e, clusterIP, netip.AddrPortFrom(node1.IPv4, nodePortOf(t, svc, v1.ProtocolTCP)))

	// An endpoint removed while kpr is down is gone once it is back.
	if err := k.Stop(); err != nil {
		t.Fatal(err)
	}
	slices := e.cp.Client.DiscoveryV1().EndpointSlices(ns)
	sl, err := slices.Get(ctx, "rs-v4", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var keep []discovery.Endpoint
	for _, ep := range sl.Endpoints {
		if ep.Addresses[0] != e.pods[1].IPv4.String() { // np-b goes
			keep = append(keep, ep)
		}
	}
	sl.Endpoints = keep
	if _, err := slices.Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := k.Start(ctx, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what string
		run  func() ([]result, error)
	}{
		{"ClusterIP from node1", func() ([]result, error) {
			out, err := node1.Exec(ctx, k.CgroupFD, e.probe, "client", "--target", netip.AddrPortFrom(clusterIP, 80).String(), "--proto", "tcp", "--count", "40", "--timeout", "1s")
			if err != nil {
				return nil, fmt.Errorf("%v: %s", err, out)
			}
			return parseResults(out)
		}},
		{"NodePort of node1 from the host", func() ([]result, error) {
			return e.hostProbe("--target", netip.AddrPortFrom(node1.IPv4, nodePortOf(t, svc, v1.ProtocolTCP)).String(), "--proto", "tcp", "--count", "40", "--timeout", "1s")
		}},
	} {
		rs, err := c.run()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			if !r.OK || r.Backend == "np-b" {
				t.Errorf("%s after the restart: %s", c.what, summary(rs))
				break
			}
		}
	}
}

// badConfigKeepsServing: kpr started with a bad setting exits at once with an error naming
// the key, and the datapath it left keeps serving.
func badConfigKeepsServing(ctx context.Context, t *testing.T, e *npEnv, clusterIP netip.Addr, nodePort netip.AddrPort) {
	t.Helper()
	node1, k := e.nodes[0], e.kprs[0]
	if err := k.Stop(); err != nil {
		t.Fatal(err)
	}
	k.Env = []string{"KPR_ACCELERATION=fast"}
	err := k.Start(ctx, 10*time.Second)
	k.Env = nil
	if err == nil || !strings.Contains(err.Error(), "acceleration") {
		t.Errorf("kpr with acceleration=fast: %v; want an exit naming the key", err)
	}
	out, err := node1.Exec(ctx, k.CgroupFD, e.probe, "client", "--target", netip.AddrPortFrom(clusterIP, 80).String(), "--proto", "tcp", "--count", "20", "--timeout", "1s")
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	rs, err := parseResults(out)
	if err != nil || countFailed(rs) > 0 || len(rs) != 20 {
		t.Errorf("ClusterIP while kpr is down after a bad config: %v %s", err, summary(rs))
	}
	rs, err = e.hostProbe("--target", nodePort.String(), "--proto", "tcp", "--count", "20", "--timeout", "1s")
	if err != nil || countFailed(rs) > 0 || len(rs) != 20 {
		t.Errorf("NodePort while kpr is down after a bad config: %v %s", err, summary(rs))
	}
	if err := k.Start(ctx, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}

// lastLinesOf returns the last n lines of log that contain what.
func lastLinesOf(log, what string, n int) string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, what) {
			out = append(out, l)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return strings.Join(out, "\n")
}

func countFailed(rs []result) int {
	n := 0
	for _, r := range rs {
		if !r.OK {
			n++
		}
	}
	return n
}
