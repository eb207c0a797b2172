package sandbox

import (
	"fmt"
	"net"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kpr-dev/kpr/test/ethtool"
)

// Offload is a device feature switched with one of the legacy ETHTOOL_S* ioctls, so ethtool(8)
// need not be installed.
type Offload struct {
	Name string // as ethtool -k names it
	cmd  uint32
}

var (
	// TxChecksum off makes the device's sender complete every checksum in software, as a frame
	// on a wire always has it. With it on (the veth default), a frame keeps CHECKSUM_PARTIAL
	// across veths and bridges, its L4 checksum field holding only the pseudo-header sum, which
	// no real NIC would ever deliver.
	TxChecksum = Offload{"tx-checksumming", unix.ETHTOOL_STXCSUM}
)

// SetLANOffload switches o on the node's LAN device (eth0).
func (n *Node) SetLANOffload(o Offload, on bool) error {
	return setOffload(n.NS, "eth0", o, on)
}

// AcceptXDPTx lets an XDP program on the node's eth0 send frames back out with XDP_TX (or
// redirect to it), as a NIC would: it attaches a program that passes every frame to the bridge's
// end of the node's veth (vn<index> in the control-plane namespace), or (on false) detaches it.
//
// A veth hands frames that its peer's XDP program sends to the peer's NAPI ring, but only
// wakes that NAPI when the peer has an XDP program itself: with GRO on instead (which also
// gives it NAPI), the frames wait in the ring until the node happens to send an ordinary
// packet, seconds later or never. The program costs every frame the node sends an XDP run and
// NAPI on the bridge side, whatever path it took. ControlPlane.Close detaches it.
func (n *Node) AcceptXDPTx(on bool) error {
	n.xdpMu.Lock()
	defer n.xdpMu.Unlock()
	port := fmt.Sprintf("vn%d", n.Index)
	if !on {
		if n.xdpPass == nil {
			return nil
		}
		err := n.xdpPass.Close()
		n.xdpPass = nil
		if err != nil {
			return fmt.Errorf("sandbox: detaching XDP from %s: %w", port, err)
		}
		return nil
	}
	if n.xdpPass != nil {
		return nil
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "pass",
		Type:         ebpf.XDP,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2 /* XDP_PASS */), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("sandbox: XDP_PASS program: %w", err)
	}
	defer prog.Close() // the link holds it
	var l link.Link
	err = inNetns(netnsPath(n.cp.NS), func() error {
		iface, err := net.InterfaceByName(port)
		if err != nil {
			return err
		}
		l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: iface.Index, Flags: link.XDPDriverMode})
		return err
	})
	if err != nil {
		return fmt.Errorf("sandbox: attaching XDP to %s in %s: %w", port, n.cp.NS, err)
	}
	n.xdpPass = l
	if !n.xdpPushed {
		// Detaching twice is fine: a later AcceptXDPTx(false) finds nothing.
		n.xdpPushed = true
		n.cp.cleanup.push("detach XDP from "+port, func() error { return n.AcceptXDPTx(false) })
	}
	return nil
}

// SetLANOffload switches o on the host's LAN device (eth0).
func (h *Host) SetLANOffload(o Offload, on bool) error {
	return setOffload(h.NS, "eth0", o, on)
}

func setOffload(ns, dev string, o Offload, on bool) error {
	err := inNetns(netnsPath(ns), func() error { return ethtool.Set(dev, o.cmd, on) })
	if err != nil {
		state := "off"
		if on {
			state = "on"
		}
		return fmt.Errorf("sandbox: %s %s on %s in %s: %w", o.Name, state, dev, ns, err)
	}
	return nil
}
