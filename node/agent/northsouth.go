package agent

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/google/nftables"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/node/config"
	"github.com/kpr-dev/kpr/node/maglev"
	"github.com/kpr-dev/kpr/node/masq"
)

// northSouth is what the agent found and set up for traffic arriving on the node's devices:
// NodePort, ExternalIP and LoadBalancer frontends in the external scope, served by the tc
// programs with SNAT.
type northSouth struct {
	devices []string
	// addrs are the global unicast addresses on the devices, in device order; nodePort those
	// of them (or of any device, for CIDRs) that NodePorts are served on.
	addrs    []netip.Addr
	nodePort []netip.Addr
	// snat4, snat6 are the addresses SNATed flows leave from: each family's primary address.
	snat4, snat6 netip.Addr
	np           *bpf.NodePort
	// devIdx are the configured devices' interface indexes (both programs); replies the
	// other devices that carry the reply program. Read from the pins once, at load.
	devIdx, replies map[int]bool
	// xdp says, per device, how the XDP program runs there ("native") or why not.
	xdp map[string]string
}

// status is the north-south part of `kpr status`.
func (ns *northSouth) status() string {
	if ns == nil || ns.np == nil {
		return "not served"
	}
	out := fmt.Sprintf("devices %s; NodePort addresses %v; SNAT from %v %v", strings.Join(ns.devices, ","), ns.nodePort, ns.snat4, ns.snat6)
	if len(ns.xdp) == 0 {
		return out + "; XDP off"
	}
	var xdp []string
	for _, d := range ns.devices {
		xdp = append(xdp, d+" "+ns.xdp[d])
	}
	return out + "; XDP: " + strings.Join(xdp, ", ")
}

// defaultRouteDevices lists the devices of the IPv4 and IPv6 default routes of the caller's
// network namespace, IPv4's first.
func defaultRouteDevices() ([]string, error) {
	var out []string
	add := func(d string) {
		if d != "" && d != "lo" && !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	f, err := os.Open("/proc/net/route")
	if err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Iface Destination Gateway Flags RefCnt Use Metric Mask ...
		fs := strings.Fields(sc.Text())
		if len(fs) >= 8 && fs[1] == "00000000" && fs[7] == "00000000" {
			add(fs[0])
		}
	}
	f.Close()
	if f, err := os.Open("/proc/net/ipv6_route"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// dst dstlen src srclen nexthop metric refcnt use flags iface
			fs := strings.Fields(sc.Text())
			if len(fs) >= 10 && fs[0] == strings.Repeat("0", 32) && fs[1] == "00" {
				add(fs[9])
			}
		}
		f.Close()
	}
	return out, nil
}

// deviceAddrs returns the global unicast addresses of the devices, in device order.
func deviceAddrs(devices []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, d := range devices {
		ifc, err := net.InterfaceByName(d)
		if err != nil {
			return nil, fmt.Errorf("devices: %s: %w", d, err)
		}
		as, err := ifc.Addrs()
		if err != nil {
			return nil, fmt.Errorf("devices: %s: %w", d, err)
		}
		for _, a := range as {
			p, err := netip.ParsePrefix(a.String())
			if err != nil || !p.Addr().IsGlobalUnicast() {
				continue
			}
			out = append(out, p.Addr().Unmap())
		}
	}
	return out, nil
}

// allAddrs returns the global unicast addresses of every device of the namespace.
func allAddrs() ([]netip.Addr, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var names []string
	for _, i := range ifs {
		names = append(names, i.Name)
	}
	return deviceAddrs(names)
}

// primary is each family's first address of addrs, IPv4's first.
func primary(addrs []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, v4 := range []bool{true, false} {
		for _, a := range addrs {
			if a.Is4() == v4 {
				out = append(out, a)
				break
			}
		}
	}
	return out
}

// selectNodePortAddrs applies nodePortAddresses (validated by config): "primary", "all", or
// CIDRs that select among every address of the node, as kube-proxy does.
func selectNodePortAddrs(spec []string, devAddrs, nodeAddrs []netip.Addr) []netip.Addr {
	if len(spec) == 0 || spec[0] == "primary" {
		return primary(devAddrs)
	}
	if spec[0] == "all" {
		return slices.Clone(devAddrs)
	}
	var out []netip.Addr
	for _, a := range nodeAddrs {
		for _, s := range spec {
			if p, err := netip.ParsePrefix(strings.TrimSpace(s)); err == nil && p.Contains(a) && !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	return out
}

// discoverNorthSouth finds the devices and the addresses the north-south datapath serves.
func discoverNorthSouth(cfg *config.Config) (*northSouth, error) {
	ns := &northSouth{devices: cfg.Devices}
	if len(ns.devices) == 0 {
		devs, err := defaultRouteDevices()
		if err != nil {
			return nil, fmt.Errorf("devices: not set, and the default routes cannot be read: %w", err)
		}
		ns.devices = devs
	}
	var err error
	if ns.addrs, err = deviceAddrs(ns.devices); err != nil {
		return nil, err
	}
	all, err := allAddrs()
	if err != nil {
		return nil, err
	}
	ns.nodePort = selectNodePortAddrs(cfg.NodePortAddresses, ns.addrs, all)
	for _, a := range primary(ns.addrs) {
		if a.Is4() {
			ns.snat4 = a
		} else {
			ns.snat6 = a
		}
	}
	return ns, nil
}

// same reports whether o found the same devices and addresses.
func (ns *northSouth) same(o *northSouth) bool {
	return slices.Equal(ns.devices, o.devices) && slices.Equal(ns.addrs, o.addrs) &&
		slices.Equal(ns.nodePort, o.nodePort) && ns.snat4 == o.snat4 && ns.snat6 == o.snat6
}

// hashSeed is the flow hash's seed for the datapath, taken from the Maglev seed so that it is
// the same on every node too.
func hashSeed(s maglev.Seed) uint32 { return binary.LittleEndian.Uint32(s[:4]) }

// loadNorthSouth loads the tc programs and attaches them to ns's devices; attachments on
// devices no longer configured are removed.
func loadNorthSouth(cfg *config.Config, ns *northSouth, seed maglev.Seed) error {
	if len(ns.devices) == 0 {
		return errors.New("devices: none set and no default route: NodePort, ExternalIP and LoadBalancer traffic from outside the node is not served")
	}
	if err := bpf.ProbeNodePort(); err != nil {
		return fmt.Errorf("kernel: %w: NodePort, ExternalIP and LoadBalancer traffic from outside the node is not served", err)
	}
	np, err := bpf.LoadNodePort(bpf.Config{
		PinDir:           cfg.BPFPinDir,
		ServiceMapSize:   cfg.ServiceMapSize,
		BackendMapSize:   cfg.BackendMapSize,
		ConntrackMapSize: cfg.ConntrackMapSize,
		MaglevTableSize:  cfg.MaglevTableSize,
		// Shared with the socket datapath, or the north-south one's own: sized alike.
		AffinityMapSize:      cfg.AffinityMapSize,
		AffinityMatchMapSize: cfg.AffinityMatchMapSize,
	}, bpf.NodePortConfig{SNATAddr4: ns.snat4, SNATAddr6: ns.snat6, HashSeed: hashSeed(seed)})
	if err != nil {
		return fmt.Errorf("loading the north-south datapath: %w", err)
	}
	want, index := map[int]bool{}, map[string]int{}
	for _, d := range ns.devices {
		ifc, err := net.InterfaceByName(d)
		if err != nil {
			np.Close()
			return fmt.Errorf("devices: %s: %w", d, err)
		}
		want[ifc.Index], index[d] = true, ifc.Index
		// tc_nodeport also takes the replies that come back through a configured device;
		// tc_nodeport_reply is for the node's other devices (syncReplies).
		if err := np.AttachTC(ifc.Index, bpf.TCNodePort); err != nil {
			np.Close()
			return fmt.Errorf("devices: %s: attaching tc %s: %w", d, bpf.TCNodePort, err)
		}
	}
	att, err := bpf.TCAttached(cfg.BPFPinDir)
	if err != nil {
		np.Close()
		return err
	}
	ns.np, ns.devIdx, ns.replies = np, want, map[int]bool{}
	for _, a := range att {
		switch {
		// Older kprs put the reply program on the configured devices too; tc_nodeport does it now.
		case a.Defunct || (!want[a.Ifindex] && a.Hook == bpf.TCNodePort) || (want[a.Ifindex] && a.Hook == bpf.TCReply):
			if err := np.DetachTC(a.Ifindex, a.Hook); err != nil {
				np.Close()
				ns.np = nil
				return fmt.Errorf("detaching tc %s from ifindex %d (gone, or no longer a configured device): %w", a.Hook, a.Ifindex, err)
			}
		case a.Hook == bpf.TCReply && !want[a.Ifindex]:
			ns.replies[a.Ifindex] = true
		}
	}
	if err := ns.syncReplies(); err != nil {
		np.Close()
		ns.np = nil
		return err
	}
	if err := ns.attachXDP(cfg.BPFPinDir, cfg.Acceleration, index, want); err != nil {
		np.Close()
		ns.np = nil
		return err
	}
	return nil
}

// attachXDP puts the XDP program on the devices (index: their interface indexes) as
// acceleration says, after the tc programs, which take what XDP passes on, and takes it off
// every other device (want: the devices' indexes).
func (ns *northSouth) attachXDP(pinDir, acceleration string, index map[string]int, want map[int]bool) error {
	ns.xdp = map[string]string{}
	if acceleration != "disabled" {
		for _, d := range ns.devices {
			err := ns.np.AttachXDP(index[d], bpf.XDPNative)
			switch {
			case err == nil:
				ns.xdp[d] = "native"
			case acceleration == "native":
				return fmt.Errorf("acceleration: native: device %s: %w", d, err)
			default:
				ns.xdp[d] = "skipped (no native XDP: " + err.Error() + ")"
			}
		}
	}
	attached, err := bpf.XDPAttached(pinDir)
	if err != nil {
		return err
	}
	for _, idx := range attached {
		if acceleration == "disabled" || !want[idx] {
			if err := ns.np.DetachXDP(idx); err != nil {
				return fmt.Errorf("detaching XDP from ifindex %d: %w", idx, err)
			}
		}
	}
	return nil
}

// syncReplies puts the reply program on every other device of the namespace, and takes it off
// devices that went: a backend on this node (a pod behind a veth, say) answers a translated
// flow through its own device, not through one of the configured ones.
func (ns *northSouth) syncReplies() error {
	ifs, err := net.Interfaces()
	if err != nil {
		return err
	}
	present := map[int]bool{}
	for _, i := range ifs {
		present[i.Index] = true
		if i.Flags&net.FlagLoopback != 0 || ns.devIdx[i.Index] || ns.replies[i.Index] {
			continue
		}
		if err := ns.np.AttachTC(i.Index, bpf.TCReply); err != nil {
			if _, gone := net.InterfaceByIndex(i.Index); gone != nil {
				continue // went while we looked
			}
			return fmt.Errorf("attaching tc %s to %s: %w", bpf.TCReply, i.Name, err)
		}
		ns.replies[i.Index] = true
	}
	for idx := range ns.replies {
		if present[idx] {
			continue
		}
		if err := ns.np.DetachTC(idx, bpf.TCReply); err != nil {
			return fmt.Errorf("detaching tc %s from ifindex %d (gone): %w", bpf.TCReply, idx, err)
		}
		delete(ns.replies, idx)
	}
	return nil
}

// applyMasquerade keeps kpr's nftables table as the config asks: masquerade of pod traffic to
// destinations outside the non-masquerade CIDRs, away from kpr's SNAT ports; or no table.
func applyMasquerade(cfg *config.Config, nw networking) (string, error) {
	conn, err := nftables.New()
	if err != nil {
		return "", fmt.Errorf("masquerade: nftables: %w", err)
	}
	m := masq.NewManager(conn, masq.DefaultTableName)
	if !cfg.Masquerade {
		return "off (masquerade: false)", m.Delete()
	}
	if len(nw.podCIDRs) == 0 {
		return "off: no pod CIDRs known (set clusterCIDR or kubeadmConfig)", m.Delete()
	}
	nonMasq := slices.Concat(nw.podCIDRs, nw.serviceCIDRs)
	if len(cfg.NonMasqueradeCIDRs) > 0 {
		nonMasq = nil
		for _, s := range cfg.NonMasqueradeCIDRs {
			p, err := netip.ParsePrefix(strings.TrimSpace(s))
			if err != nil {
				return "", fmt.Errorf("nonMasqueradeCIDRs: %q is not a CIDR", s)
			}
			nonMasq = append(nonMasq, p.Masked())
		}
	}
	snat := masq.SuggestedSNATPortRange()
	rs, err := masq.Rules(masq.Config{PodCIDRs: nw.podCIDRs, NonMasqCIDRs: nonMasq, ReservedPortRange: snat})
	if err != nil {
		return "", fmt.Errorf("masquerade (clusterCIDR, nonMasqueradeCIDRs): %w", err)
	}
	if err := m.Apply(rs); err != nil {
		return "", fmt.Errorf("masquerade: %w", err)
	}
	return fmt.Sprintf("pod CIDRs %v to destinations outside %v (%d rules)", nw.podCIDRs, nonMasq, rs.RuleCount()), nil
}

// DeleteMasquerade removes kpr's nftables table, for `kpr cleanup`.
func DeleteMasquerade() error {
	conn, err := nftables.New()
	if err != nil {
		return err
	}
	return masq.NewManager(conn, masq.DefaultTableName).Delete()
}
