package sandbox

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
)

// Host is a network namespace standing in for a machine outside the cluster on the test LAN: a
// client of NodePorts, external IPs and load-balancer IPs. It has a LAN address of each family
// and no default route, so it reaches only the LAN itself and what a test routes explicitly
// (RouteVia); a packet to any other address fails at the host (ENETUNREACH) and never leaves the
// sandbox.
//
//	<prefix>-<name>      eth0 198.18.0.(200+i)/24 fd6b:7072::(200+i)/64 (bridged to br0),
//	                     no default route, forwarding off.
type Host struct {
	Name  string
	NS    string // network namespace
	IPv4  netip.Addr
	IPv6  netip.Addr
	Index int

	cp *ControlPlane
}

// Valid host indexes: 198.18.0.(200+index) must stay a host address of the /24.
const (
	minHostIndex = 0
	maxHostIndex = 54
	// hostAddrBase is the last octet of host index 0. Node index hostAddrBase-10+i would have
	// the same address as host i; AddNode and AddExternalHost refuse such a pair.
	hostAddrBase = 200
)

// HostIPs returns the LAN addresses of external host index: 198.18.0.(200+index) and
// fd6b:7072::(200+index) (the decimal number written as hex text, like nodes').
func HostIPs(index int) (v4, v6 netip.Addr) {
	return netip.AddrFrom4([4]byte{198, 18, 0, byte(hostAddrBase + index)}), mnemonicV6("fd6b:7072::%d", hostAddrBase+index)
}

// AddExternalHost creates host namespace "<prefix>-<name>" on the test LAN (a veth to br0 in the
// control-plane namespace, like a node's) with the addresses of HostIPs(index), forwarding off
// and no default route. ControlPlane.Close removes it; on failure nothing of it is left. The
// name must not be a node's, the index not another host's, and no node may have the same
// addresses (node index 190+index).
func (cp *ControlPlane) AddExternalHost(ctx context.Context, name string, index int) (*Host, error) {
	if !nodeNameRE.MatchString(name) {
		return nil, fmt.Errorf("sandbox: host name %q: want a short DNS label (at most 20 characters)", name)
	}
	if index < minHostIndex || index > maxHostIndex {
		return nil, fmt.Errorf("sandbox: host index %d out of range %d..%d", index, minHostIndex, maxHostIndex)
	}
	cp.topo.Lock()
	defer cp.topo.Unlock()
	if cp.isClosed() {
		return nil, fmt.Errorf("sandbox: closed")
	}
	if _, ok := cp.nodes[name]; ok {
		return nil, fmt.Errorf("sandbox: host %s: a node has that name", name)
	}
	if cp.hostWithName(name) != nil {
		return nil, fmt.Errorf("sandbox: host %s exists", name)
	}
	for _, h := range cp.hosts {
		if h.Index == index {
			return nil, fmt.Errorf("sandbox: host index %d is taken by %s", index, h.Name)
		}
	}
	if n, ok := cp.indexes[hostAddrBase-10+index]; ok {
		return nil, fmt.Errorf("sandbox: host index %d has the addresses of node %s (index %d)", index, n.Name, n.Index)
	}
	v4, v6 := HostIPs(index)
	h := &Host{Name: name, NS: cp.Prefix + "-" + name, IPv4: v4, IPv6: v6, Index: index, cp: cp}
	var cs cleanupStack
	if err := cp.addHost(ctx, &cs, h); err != nil {
		if cerr := cs.unwind(); cerr != nil {
			err = fmt.Errorf("%w (cleanup: %v)", err, cerr)
		}
		return nil, fmt.Errorf("sandbox: host %s: %w", name, err)
	}
	cs.moveTo(&cp.cleanup, "host "+name)
	cp.hosts = append(cp.hosts, h)
	cp.log("sandbox: external host %s in %s: %s %s", name, h.NS, v4, v6)
	return h, nil
}

func (cp *ControlPlane) addHost(ctx context.Context, cs *cleanupStack, h *Host) error {
	if err := cp.newNamespace(ctx, cs, h.NS,
		"net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0", "net.ipv6.conf.default.forwarding=0"); err != nil {
		return err
	}
	bridgePort := fmt.Sprintf("vh%d", h.Index)
	if err := ipIn(ctx, cp.NS, "link", "add", bridgePort, "type", "veth", "peer", "name", "eth0", "netns", h.NS); err != nil {
		return err
	}
	cs.push("delete "+bridgePort, func() error {
		// Gone already when the host namespace went first; deleting either end removes both.
		if _, err := os.Stat(netnsPath(h.NS)); err != nil {
			return nil
		}
		return ipIn(context.Background(), cp.NS, "link", "del", bridgePort)
	})
	if err := ipIn(ctx, cp.NS, "link", "set", bridgePort, "master", "br0", "up"); err != nil {
		return err
	}
	// Only the connected routes of the LAN: no default route, in either family.
	return ipBatch(ctx, h.NS,
		[]string{"addr", "add", h.IPv4.String() + "/24", "dev", "eth0"},
		[]string{"-6", "addr", "add", h.IPv6.String() + "/64", "dev", "eth0", "nodad"},
		[]string{"link", "set", "eth0", "up"},
	)
}

// hostWithAddr returns the external host holding v4, if any; callers hold cp.topo.
func (cp *ControlPlane) hostWithAddr(v4 netip.Addr) *Host {
	for _, h := range cp.hosts {
		if h.IPv4 == v4 {
			return h
		}
	}
	return nil
}

// hostWithName returns the external host called name, if any; callers hold cp.topo.
func (cp *ControlPlane) hostWithName(name string) *Host {
	for _, h := range cp.hosts {
		if h.Name == name {
			return h
		}
	}
	return nil
}

// RouteVia adds or replaces (ip route replace) the host's route for prefix, with node n's LAN
// address of the prefix's family as the gateway. Switching a prefix between nodes is one call.
func (h *Host) RouteVia(ctx context.Context, prefix netip.Prefix, n *Node) error {
	if !prefix.IsValid() || prefix.Addr().Is4In6() {
		return fmt.Errorf("sandbox: host %s: route %s: want an IPv4 or IPv6 prefix", h.Name, prefix)
	}
	if n == nil || n.cp != h.cp {
		return fmt.Errorf("sandbox: host %s: route %s: the gateway is not a node of this sandbox", h.Name, prefix)
	}
	prefix = prefix.Masked()
	args := []string{"route", "replace", prefix.String(), "via", n.IPv4.String(), "dev", "eth0"}
	if prefix.Addr().Is6() {
		args = []string{"-6", "route", "replace", prefix.String(), "via", n.IPv6.String(), "dev", "eth0"}
	}
	if err := ipIn(ctx, h.NS, args...); err != nil {
		return fmt.Errorf("sandbox: host %s: %w", h.Name, err)
	}
	return nil
}

// DeleteRoute removes the host's route for prefix (added by RouteVia); a missing route is an
// error.
func (h *Host) DeleteRoute(ctx context.Context, prefix netip.Prefix) error {
	if !prefix.IsValid() || prefix.Addr().Is4In6() {
		return fmt.Errorf("sandbox: host %s: route %s: want an IPv4 or IPv6 prefix", h.Name, prefix)
	}
	prefix = prefix.Masked()
	args := []string{"route", "del", prefix.String()}
	if prefix.Addr().Is6() {
		args = append([]string{"-6"}, args...)
	}
	if err := ipIn(ctx, h.NS, args...); err != nil {
		return fmt.Errorf("sandbox: host %s: %w", h.Name, err)
	}
	return nil
}

// DialContext opens a connection from inside the host namespace (IP literals only).
func (h *Host) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return dialInNetns(ctx, netnsPath(h.NS), network, address)
}

// Start runs a long-lived command inside the host namespace (see Node.Start).
func (h *Host) Start(ctx context.Context, name string, args ...string) (*Process, error) {
	return h.StartCmd(ctx, Cmd{Name: name, Args: args})
}

// StartCmd is Start with a cgroup and environment.
func (h *Host) StartCmd(ctx context.Context, c Cmd) (*Process, error) {
	return h.cp.procs.start(ctx, h.NS, c, "")
}

// Exec runs a short command inside the host namespace (see Node.Exec).
func (h *Host) Exec(ctx context.Context, cgroupFD int, name string, args ...string) ([]byte, error) {
	return h.cp.procs.exec(ctx, h.NS, Cmd{Name: name, Args: args, CgroupFD: cgroupFD})
}
