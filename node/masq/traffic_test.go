package masq

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestKernelTraffic sends real TCP connections from a pod through a node
// with kpr's table to an outside server, all in namespaces of its own:
//
//	pod netns                node netns (kpr table)            outside netns
//	10.244.1.2  eth0 ---- veth-pod 10.244.1.1                  198.18.0.1, 198.18.1.1 (peer net)
//	fd6b:7072:244:1::2       eth0 198.18.0.11 ---------------- eth0
//	                         fd6b:7072::11                      fd6b:7072::1, fd6b:7072:1::1
//
// The server reports the source it sees. 198.18.1.0/24 and fd6b:7072:1::/64
// are non-masquerade CIDRs (a peer network that routes back to the pods).
func TestKernelTraffic(t *testing.T) {
	requirePrivileged(t)
	pod, node, out := newNetns(t, "pod"), newNetns(t, "node"), newNetns(t, "out")

	node.run(t, "ip", "link", "add", "veth-pod", "type", "veth", "peer", "name", "eth0", "netns", pod.name)
	node.run(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", out.name)
	for _, step := range []struct {
		ns   *netns
		args string
	}{
		{pod, "addr add 10.244.1.2/24 dev eth0"},
		{pod, "-6 addr add fd6b:7072:244:1::2/64 dev eth0 nodad"},
		{pod, "link set eth0 up"},
		{pod, "route add default via 10.244.1.1"},
		{pod, "-6 route add default via fd6b:7072:244:1::1"},

		{node, "addr add 10.244.1.1/24 dev veth-pod"},
		{node, "-6 addr add fd6b:7072:244:1::1/64 dev veth-pod nodad"},
		{node, "addr add 198.18.0.11/24 dev eth0"},
		{node, "-6 addr add fd6b:7072::11/64 dev eth0 nodad"},
		{node, "link set veth-pod up"},
		{node, "link set eth0 up"},
		{node, "route add 198.18.1.0/24 via 198.18.0.1"},
		{node, "-6 route add fd6b:7072:1::/64 via fd6b:7072::1"},

		{out, "addr add 198.18.0.1/24 dev eth0"},
		{out, "addr add 198.18.1.1/32 dev lo"},
		{out, "-6 addr add fd6b:7072::1/64 dev eth0 nodad"},
		{out, "-6 addr add fd6b:7072:1::1/128 dev lo nodad"},
		{out, "link set eth0 up"},
		{out, "route add 10.244.0.0/16 via 198.18.0.11"},
		{out, "-6 route add fd6b:7072:244::/56 via fd6b:7072::11"},
	} {
		step.ns.run(t, append([]string{"ip"}, strings.Fields(step.args)...)...)
	}
	node.run(t, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

	ports := PortRange{40000, 40099}
	cfg := Config{
		PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6},
		NonMasqCIDRs: []netip.Prefix{podCIDR4, podCIDR6, svcCIDR4, svcCIDR6,
			pfx("198.18.1.0/24"), pfx("fd6b:7072:1::/64")},
		MasqPortRange: ports,
	}
	if err := NewManager(node.conn(t), "").Apply(mustRules(t, cfg)); err != nil {
		t.Fatal(err)
	}

	startSourceServer(t, out)

	type check struct {
		name      string
		dst       string
		localPort int
		wantAddr  string
		wantPorts func(uint16) bool
	}
	inRange := func(p uint16) bool { return ports.First <= p && p <= ports.Last }
	privileged := func(p uint16) bool { return p < 1024 }
	anyPort := func(uint16) bool { return true }
	var checks []check
	for i := range 5 {
		checks = append(checks,
			check{fmt.Sprintf("IPv4 outside #%d", i), "198.18.0.1", 0, "198.18.0.11", inRange},
			check{fmt.Sprintf("IPv6 outside #%d", i), "fd6b:7072::1", 0, "fd6b:7072::11", inRange})
	}
	checks = append(checks,
		check{"IPv4 outside from a privileged port", "198.18.0.1", 700, "198.18.0.11", privileged},
		check{"IPv6 outside from a privileged port", "fd6b:7072::1", 701, "fd6b:7072::11", privileged},
		check{"IPv4 non-masquerade CIDR", "198.18.1.1", 0, "10.244.1.2", anyPort},
		check{"IPv6 non-masquerade CIDR", "fd6b:7072:1::1", 0, "fd6b:7072:244:1::2", anyPort},
	)
	for _, c := range checks {
		src, err := dialAndRead(pod, c.dst, c.localPort)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if src.Addr().String() != c.wantAddr || !c.wantPorts(src.Port()) {
			t.Errorf("%s: server saw %s, want %s with the right port", c.name, src, c.wantAddr)
		} else {
			t.Logf("%s: server saw %s", c.name, src)
		}
	}
}

// startSourceServer listens on port 8080 (both families) in ns and answers each
// connection with the remote address it sees. It stops at test cleanup.
func startSourceServer(t *testing.T, ns *netns) {
	t.Helper()
	var ln net.Listener
	if err := ns.do(func() (err error) {
		ln, err = net.Listen("tcp", "[::]:8080")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			ap := c.RemoteAddr().(*net.TCPAddr).AddrPort()
			_, _ = c.Write([]byte(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String() + "\n"))
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
}

// dialAndRead connects from ns to dst:8080 (from localPort if not 0) and
// returns the source address the server reports.
func dialAndRead(ns *netns, dst string, localPort int) (netip.AddrPort, error) {
	var conn net.Conn
	err := ns.do(func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second}
		if localPort != 0 {
			d.LocalAddr = &net.TCPAddr{Port: localPort}
		}
		conn, err = d.Dial("tcp", net.JoinHostPort(dst, "8080"))
		return err
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return netip.AddrPort{}, err
	}
	line = strings.TrimSpace(line)
	if line == "" {
		return netip.AddrPort{}, errors.New("empty answer")
	}
	return netip.ParseAddrPort(line)
}
