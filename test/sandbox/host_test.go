package sandbox

import (
	"bufio"
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestHostAddressing(t *testing.T) {
	for _, tc := range []struct {
		index    int
		v4, v6   string
		nodeSame int // the node index with the same addresses
	}{
		{0, "198.18.0.200", "fd6b:7072::200", 190},
		{1, "198.18.0.201", "fd6b:7072::201", 191},
		{54, "198.18.0.254", "fd6b:7072::254", 244},
	} {
		v4, v6 := HostIPs(tc.index)
		if v4.String() != tc.v4 || v6.String() != tc.v6 {
			t.Errorf("host %d: %s %s, want %s %s", tc.index, v4, v6, tc.v4, tc.v6)
		}
		n4, n6 := NodeIPs(tc.nodeSame)
		if n4 != v4 || n6 != v6 {
			t.Errorf("host %d: node %d has %s %s; the collision guard assumes %s %s", tc.index, tc.nodeSame, n4, n6, v4, v6)
		}
		lan4, lan6 := netip.MustParsePrefix("198.18.0.0/24"), netip.MustParsePrefix("fd6b:7072::/64")
		if !lan4.Contains(v4) || !lan6.Contains(v6) {
			t.Errorf("host %d: %s %s outside the LAN", tc.index, v4, v6)
		}
	}
	// Nodes 1..189 never collide with hosts.
	for i := 1; i < hostAddrBase-10; i++ {
		n4, _ := NodeIPs(i)
		for h := minHostIndex; h <= maxHostIndex; h++ {
			if h4, _ := HostIPs(h); h4 == n4 {
				t.Fatalf("node %d and host %d share %s", i, h, n4)
			}
		}
	}
}

func TestExternalHost(t *testing.T) {
	requireSandbox(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()

	probe, err := BuildProbe(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cp, err := Start(ctx, Options{WorkDir: t.TempDir(), Log: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			if err := cp.Close(); err != nil {
				t.Error(err)
			}
		}
	})
	node1, err := cp.AddNode(ctx, "node1", 1)
	if err != nil {
		t.Fatal(err)
	}
	node2, err := cp.AddNode(ctx, "node2", 2)
	if err != nil {
		t.Fatal(err)
	}
	pod, err := node2.AddPod(ctx, "e2e", "pod-c", 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pod.Start(ctx, probe, "serve", "--name", pod.Name, "--tcp", "8080", "--udp", "8080"); err != nil {
		t.Fatal(err)
	}
	if out, err := node2.Exec(ctx, 0, probe, "ready", "--target", target(pod.IPv4, 8080), "--timeout", "10s"); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	host, err := cp.AddExternalHost(ctx, "ext", 0)
	if err != nil {
		t.Fatal(err)
	}
	if host.IPv4.String() != "198.18.0.200" || host.IPv6.String() != "fd6b:7072::200" || host.NS != cp.Prefix+"-ext" {
		t.Fatalf("host %s: %s %s", host.NS, host.IPv4, host.IPv6)
	}

	t.Run("names, indexes and addresses are unique", func(t *testing.T) {
		if _, err := cp.AddExternalHost(ctx, "node1", 5); err == nil {
			t.Error("a host named like a node was created")
		}
		if _, err := cp.AddExternalHost(ctx, "other", 0); err == nil {
			t.Error("a second host with index 0 was created")
		}
		if _, err := cp.AddExternalHost(ctx, "ext", 3); err == nil {
			t.Error("a second host named ext was created")
		}
		if _, err := cp.AddNode(ctx, "node190", 190); err == nil || !strings.Contains(err.Error(), "external host ext") {
			t.Errorf("node index 190 (the host's addresses): %v", err)
		}
		if _, err := cp.AddNode(ctx, "ext", 3); err == nil {
			t.Error("a node named like a host was created")
		}
	})

	t.Run("no default route", func(t *testing.T) {
		for _, fam := range []string{"-4", "-6"} {
			out, err := host.Exec(ctx, 0, "ip", fam, "route", "show", "default")
			if err != nil || strings.TrimSpace(string(out)) != "" {
				t.Errorf("ip %s route show default: %q %v", fam, out, err)
			}
		}
		for _, key := range []string{"net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"} {
			if v, err := readSysctl(ctx, host.NS, key); err != nil || v != "0" {
				t.Errorf("%s = %q (%v), want 0", key, v, err)
			}
		}
		for _, dst := range []netip.Addr{pod.IPv4, pod.IPv6, netip.MustParseAddr("198.51.100.10")} {
			r := runClient(t, ctx, host.Exec, probe, target(dst, 8080), "tcp", "", 1, "--timeout", "1s")[0]
			if r.OK || r.Errno != "ENETUNREACH" {
				t.Errorf("%s without a route: %+v, want ENETUNREACH", dst, r)
			}
		}
	})

	t.Run("the LAN is reachable both ways", func(t *testing.T) {
		if _, err := host.Start(ctx, probe, "serve", "--name", "ext", "--tcp", "9000"); err != nil {
			t.Fatal(err)
		}
		for _, dst := range []netip.Addr{host.IPv4, host.IPv6} {
			if out, err := node1.Exec(ctx, 0, probe, "ready", "--target", target(dst, 9000), "--timeout", "10s"); err != nil {
				t.Fatalf("node1 -> host %s: %v %s", dst, err, out)
			}
			r := runClient(t, ctx, node1.Exec, probe, target(dst, 9000), "tcp", "", 1)[0]
			if !r.OK || r.Backend != "ext" {
				t.Errorf("node1 -> host %s: %+v", dst, r)
			}
		}
	})

	t.Run("RouteVia", func(t *testing.T) {
		cidr4, cidr6 := node2.PodCIDRs[0], node2.PodCIDRs[1]
		for _, step := range []struct {
			prefix netip.Prefix
			via    *Node
			dst    netip.Addr
			seenAs netip.Addr
		}{
			{cidr4, node2, pod.IPv4, host.IPv4},
			{cidr4, node1, pod.IPv4, host.IPv4}, // replaced: node1 forwards to node2
			{cidr6, node1, pod.IPv6, host.IPv6},
			{cidr6, node2, pod.IPv6, host.IPv6},
		} {
			if err := host.RouteVia(ctx, step.prefix, step.via); err != nil {
				t.Fatal(err)
			}
			fam := "-4"
			gw := step.via.IPv4
			if step.dst.Is6() {
				fam, gw = "-6", step.via.IPv6
			}
			out, err := host.Exec(ctx, 0, "ip", fam, "route", "show", step.prefix.String())
			if err != nil || strings.Count(string(out), "via") != 1 || !strings.Contains(string(out), "via "+gw.String()+" ") {
				t.Fatalf("route %s after RouteVia %s: %q %v", step.prefix, step.via.Name, out, err)
			}
			for _, proto := range []string{"tcp", "udp"} {
				r := runClient(t, ctx, host.Exec, probe, target(step.dst, 8080), proto, "", 1)[0]
				if !r.OK || r.Backend != pod.Name || addrOf(r.SeenAs) != step.seenAs {
					t.Errorf("%s %s via %s: %+v; want %s seeing %s", proto, step.dst, step.via.Name, r, pod.Name, step.seenAs)
				}
			}
		}
		conn, err := host.DialContext(ctx, "tcp", target(pod.IPv6, 8080))
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Write([]byte("PROBE\n")); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		if name, seen, _ := strings.Cut(strings.TrimSpace(line), " "); err != nil || name != pod.Name || addrOf(seen) != host.IPv6 {
			t.Errorf("Host.DialContext: %q %v", line, err)
		}
		if err := host.RouteVia(ctx, netip.MustParsePrefix("::ffff:10.0.0.0/104"), node1); err == nil {
			t.Error("RouteVia accepted an IPv4-mapped prefix")
		}
		if err := host.DeleteRoute(ctx, cidr4); err != nil {
			t.Fatal(err)
		}
		if r := runClient(t, ctx, host.Exec, probe, target(pod.IPv4, 8080), "tcp", "", 1)[0]; r.OK || r.Errno != "ENETUNREACH" {
			t.Errorf("after DeleteRoute: %+v, want ENETUNREACH", r)
		}
	})

	procs := cp.Processes()
	closed = true
	if err := cp.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(netnsPath(host.NS)); err == nil {
		t.Errorf("host namespace %s left after Close", host.NS)
	}
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), cp.Prefix) {
		t.Errorf("namespaces left after Close:\n%s", out)
	}
	for _, p := range procs {
		if err := syscall.Kill(p.Pid(), 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("%s pid %d still exists after Close (kill 0: %v)", p.Name, p.Pid(), err)
		}
	}
}
