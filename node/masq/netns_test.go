package masq

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Helpers for tests that need the kernel. Everything happens in network
// namespaces the test creates (ip netns add kpr-masq-<random>-<role>) and
// deletes in t.Cleanup, also on failure; the root namespace's ruleset, links,
// routes and sysctls are never changed. Commands run under nsenter --net,
// never "ip netns exec".

const cmdTimeout = 10 * time.Second

// requirePrivileged skips without root, or fails if KPR_E2E=1 asks for the
// kernel tests to run.
func requirePrivileged(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("KPR_E2E") == "1" {
			t.Fatal("KPR_E2E=1 but not root: the nftables tests need root for network namespaces")
		}
		t.Skip("needs root: creates network namespaces and nftables tables in them")
	}
	for _, tool := range []string{"ip", "nsenter", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("KPR_E2E") == "1" {
				t.Fatalf("KPR_E2E=1 but %s is missing: %v", tool, err)
			}
			t.Skipf("needs %s: %v", tool, err)
		}
	}
}

type netns struct {
	name string
	path string
	fd   *os.File
}

// newNetns creates a named network namespace for this test.
func newNetns(t *testing.T, role string) *netns {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	name := "kpr-masq-" + hex.EncodeToString(b) + "-" + role
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := command(context.Background(), "ip", "netns", "del", name); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	ns := &netns{name: name, path: filepath.Join("/run/netns", name)}
	f, err := os.Open(ns.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() }) // before the delete above (cleanups run last-in first-out)
	ns.fd = f
	ns.run(t, "ip", "link", "set", "lo", "up")
	return ns
}

func command(ctx context.Context, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, cmdTimeout)
	defer cancel()
	return exec.CommandContext(ctx, name, args...).CombinedOutput()
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := command(context.Background(), name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// run runs a command in the namespace.
func (ns *netns) run(t *testing.T, args ...string) string {
	t.Helper()
	return run(t, "nsenter", append([]string{"--net=" + ns.path, "--"}, args...)...)
}

// nft loads a ruleset text into the namespace with nft -f.
func (ns *netns) nft(t *testing.T, ruleset string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", "--net="+ns.path, "--", "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f in %s: %v\n%s\ninput:\n%s", ns.name, err, out, ruleset)
	}
}

func (ns *netns) conn(t *testing.T) *nftables.Conn {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns.fd.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// do runs fn on an OS thread switched into the namespace. Sockets fn creates
// stay in the namespace and may be used from any goroutine afterwards.
func (ns *netns) do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(ns.fd.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", ns.name, err)
			return
		}
		fnErr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Stay locked: the thread exits with the goroutine instead of
			// running other goroutines in the wrong namespace.
			errc <- fmt.Errorf("returning from %s: %w", ns.name, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// nftObject is one entry of nft -j list ruleset, e.g. {"rule": {...}}.
type nftObject map[string]map[string]any

// listJSON returns the objects of nft -j list ruleset in the namespace,
// without metainfo.
func (ns *netns) listJSON(t *testing.T) []nftObject {
	t.Helper()
	out := ns.run(t, "nft", "-j", "list", "ruleset")
	var doc struct {
		Nftables []nftObject `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("nft -j list ruleset: %v\n%s", err, out)
	}
	var objs []nftObject
	for _, o := range doc.Nftables {
		if _, meta := o["metainfo"]; !meta {
			objs = append(objs, o)
		}
	}
	return objs
}

// kind, family and table of an nft JSON object ("table" objects name
// themselves).
func (o nftObject) describe() (kind, family, table string) {
	for k, v := range o {
		kind = k
		family, _ = v["family"].(string)
		if k == "table" {
			table, _ = v["name"].(string)
		} else {
			table, _ = v["table"].(string)
		}
	}
	return kind, family, table
}

// isKpr reports whether o belongs to a table named name in ip or ip6.
func (o nftObject) isKpr(name string) bool {
	_, family, table := o.describe()
	return table == name && (family == "ip" || family == "ip6")
}

// canonical renders objects without handles, for comparison.
func canonical(t *testing.T, objs []nftObject) string {
	t.Helper()
	var b bytes.Buffer
	for _, o := range objs {
		for _, v := range o {
			delete(v, "handle")
		}
		j, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		b.Write(j)
		b.WriteByte('\n')
	}
	return b.String()
}

func filterObjects(objs []nftObject, keep func(nftObject) bool) []nftObject {
	var out []nftObject
	for _, o := range objs {
		if keep(o) {
			out = append(out, o)
		}
	}
	return out
}

// generations counts nftables transactions committed in a namespace.
type generations struct {
	ns  *netns
	mon *nftables.Monitor
	ch  chan *nftables.MonitorEvents
}

func watchGenerations(t *testing.T, ns *netns) *generations {
	t.Helper()
	mon := nftables.NewMonitor(nftables.WithMonitorEventBuffer(1024))
	ch, err := ns.conn(t).AddGenerationalMonitor(mon)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mon.Close() })
	return &generations{ns: ns, mon: mon, ch: ch}
}

// since returns how many transactions were committed since the last call: it
// commits a marker transaction of its own and counts those before it.
func (g *generations) since(t *testing.T) int {
	t.Helper()
	const marker = "kpr-masq-test-marker"
	g.ns.run(t, "nft", "add table ip "+marker+"; delete table ip "+marker)
	timeout := time.After(cmdTimeout)
	n := 0
	for {
		select {
		case ev, ok := <-g.ch:
			if !ok {
				t.Fatal("nftables monitor closed")
			}
			if ev.GeneratedBy != nil && ev.GeneratedBy.Error != nil {
				t.Fatalf("nftables monitor: %v", ev.GeneratedBy.Error)
			}
			for _, c := range ev.Changes {
				if tbl, ok := c.Data.(*nftables.Table); ok && tbl.Name == marker {
					return n
				}
			}
			n++
		case <-timeout:
			t.Fatalf("no marker transaction seen after %d transactions", n)
		}
	}
}
