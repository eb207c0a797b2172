package bpf

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// NodePort is the loaded north-south datapath (lb.c): the tc programs for NodePort,
// ExternalIP and LoadBalancer frontends in SNAT mode, and their maps. Its programs stay
// attached after Close: the links are pinned.
type NodePort struct {
	Maps *NodePortMaps

	pinDir string
	objs   lbObjects
}

// LoadNodePort loads the north-south programs into cfg.PinDir, the pin directory of the
// socket load balancer (Load): both objects pin the frontend and backend maps by the same
// names, so they share them, whichever is loaded first. The map sizes come from the same
// Config fields; cfg.CgroupPath is not used. np is written to kpr_lb_config_v1. Nothing is
// attached: see AttachTC.
func LoadNodePort(cfg Config, np NodePortConfig) (_ *NodePort, err error) {
	if cfg.PinDir == "" {
		return nil, fmt.Errorf("config PinDir: empty")
	}
	sizes, tableSize, err := cfg.lbMapSizes()
	if err != nil {
		return nil, err
	}
	raw, err := np.raw(tableSize)
	if err != nil {
		return nil, err
	}
	if err := checkBPFFS(cfg.PinDir); err != nil {
		return nil, fmt.Errorf("config PinDir: %w", err)
	}

	spec, err := loadLb()
	if err != nil {
		return nil, err
	}
	for _, s := range sizes {
		spec.Maps[s.mapName].MaxEntries = uint32(s.size)
	}
	spec.Maps[lbMapKprMaglevV1].InnerMap.MaxEntries = uint32(tableSize)

	if err := os.MkdirAll(filepath.Join(cfg.PinDir, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w", err)
	}
	if err := checkPinnedMaps(cfg.PinDir, spec, sizes); err != nil {
		return nil, err
	}
	if err := checkPinnedMaglevSize(cfg.PinDir, tableSize); err != nil {
		return nil, err
	}

	newReplyPorts := notPinned(cfg.PinDir, lbMapKprLbReplyPortsV1)
	n := &NodePort{pinDir: cfg.PinDir}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: cfg.PinDir}}
	if err := spec.LoadAndAssign(&n.objs, opts); err != nil {
		return nil, verboseError("load BPF objects", err)
	}
	n.Maps = &NodePortMaps{
		config:     n.objs.KprLbConfigV1,
		ct:         n.objs.KprLbCtV1,
		snat:       n.objs.KprLbSnatV1,
		stats:      n.objs.KprLbStatsV1,
		maglev:     n.objs.KprMaglevV1,
		srcRanges:  n.objs.KprLbSrcRangesV1,
		affinity:   n.objs.KprLbAffinityV1,
		replyPorts: n.objs.KprLbReplyPortsV1,
		tableSize:  tableSize,
	}
	defer func() {
		if err != nil {
			n.Close()
		}
	}()
	if err := n.Maps.config.Update(uint32(0), &raw, ebpf.UpdateAny); err != nil {
		return nil, fmt.Errorf("update %s: %w", lbMapKprLbConfigV1, err)
	}
	if newReplyPorts {
		if err := seedReplyPorts(n.Maps.snat, n.Maps.replyPorts); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// seedReplyPorts marks the backend port of every reverse entry in snat: a kpr without
// kpr_lb_reply_ports_v1 left flows whose replies the programs would otherwise no longer
// look up (see the map in lb.c).
func seedReplyPorts(snat, ports *ebpf.Map) error {
	return seedPortMarks(snat, ports, func(k *lbFlowKey) uint16 { return k.Sport },
		lbMapKprLbSnatV1, lbMapKprLbReplyPortsV1)
}

// checkPinnedMaglevSize refuses a table size other than the one the pinned kpr_maglev_v1 was
// created with: the kernel only accepts inner maps of the outer map's original size.
func checkPinnedMaglevSize(pinDir string, tableSize int) error {
	if _, err := os.Stat(filepath.Join(pinDir, lbMapKprMaglevV1)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, lbMapKprLbConfigV1), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned map %s: %w", lbMapKprLbConfigV1, err)
	}
	defer m.Close()
	var c lbLbConfig
	if err := m.Lookup(uint32(0), &c); err != nil {
		return fmt.Errorf("read pinned map %s: %w", lbMapKprLbConfigV1, err)
	}
	if c.MaglevSize != 0 && int(c.MaglevSize) != tableSize {
		return fmt.Errorf("pinned map %s in %s holds Maglev tables of %d entries but config MaglevTableSize is %d: set MaglevTableSize to %d, or remove the datapath with `kpr cleanup` to resize",
			lbMapKprMaglevV1, pinDir, c.MaglevSize, tableSize, c.MaglevSize)
	}
	return nil
}

// Close releases the file descriptors. Pins, attachments and map contents stay.
func (n *NodePort) Close() error {
	// n.Maps holds the same maps as n.objs.
	n.Maps = nil
	return n.objs.Close()
}

func (n *NodePort) program(h TCHook) (*ebpf.Program, error) {
	switch h {
	case TCNodePort:
		return n.objs.TcNodeport, nil
	case TCReply:
		return n.objs.TcNodeportReply, nil
	}
	return nil, fmt.Errorf("unknown tc hook %d", h)
}

// AttachTC attaches the program of hook at ingress of the device with index ifindex in the
// caller's network namespace, through a tcx link (Linux 6.6) pinned in the pin directory. A
// pinned link of the same hook and device is updated in place to the loaded program, so a
// restart never leaves the device without translation. The programs pass on what is not
// theirs (TCX_NEXT): they can share a device with each other and with other programs.
func (n *NodePort) AttachTC(ifindex int, hook TCHook) error {
	prog, err := n.program(hook)
	if err != nil {
		return err
	}
	if ifindex <= 0 {
		return fmt.Errorf("attach %s: invalid interface index %d", hook, ifindex)
	}
	pin := filepath.Join(n.pinDir, linksDir, tcPinName(hook, ifindex))
	old, err := link.LoadPinnedLink(pin, nil)
	switch {
	case errors.Is(err, os.ErrNotExist):
		l, err := attachTCX(ifindex, hook, prog)
		if err != nil {
			return err
		}
		defer l.Close()
		if err := l.Pin(pin); err != nil {
			l.Detach()
			return fmt.Errorf("pin tcx link %s: %w", pin, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("open pinned link %s: %w", pin, err)
	}
	defer old.Close()

	if tcxTargets(old, ifindex) {
		err := old.Update(prog)
		if err == nil {
			return nil
		}
		// ENOLINK: the device went away under the link; attach anew below.
		if !errors.Is(err, unix.ENOLINK) {
			return fmt.Errorf("update pinned link %s: %w", pin, err)
		}
	}

	// The pinned link is defunct (its device is gone, ifindex now names another one):
	// attach anew, atomically replace the pin, then drop the old link.
	l, err := attachTCX(ifindex, hook, prog)
	if err != nil {
		return err
	}
	defer l.Close()
	// bpffs reserves names with dots.
	tmp := pin + "_new"
	_ = os.Remove(tmp)
	if err := l.Pin(tmp); err != nil {
		l.Detach()
		return fmt.Errorf("pin tcx link: %w", err)
	}
	if err := os.Rename(tmp, pin); err != nil {
		_ = os.Remove(tmp)
		l.Detach()
		return fmt.Errorf("replace pinned link %s: %w", pin, err)
	}
	if err := old.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
		return fmt.Errorf("detach replaced link %s: %w", pin, err)
	}
	return nil
}

// AttachTCByName is AttachTC for the device named dev in the caller's network namespace.
func (n *NodePort) AttachTCByName(dev string, hook TCHook) error {
	ifi, err := net.InterfaceByName(dev)
	if err != nil {
		return fmt.Errorf("attach %s: %w", hook, err)
	}
	return n.AttachTC(ifi.Index, hook)
}

func attachTCX(ifindex int, hook TCHook, prog *ebpf.Program) (link.Link, error) {
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: ebpf.AttachTCXIngress})
	if errors.Is(err, link.ErrNotSupported) || errors.Is(err, ebpf.ErrNotSupported) {
		return nil, fmt.Errorf("attach %s to interface %d: kernel feature missing: tcx links (Linux 6.6): %w", hook, ifindex, err)
	}
	if err != nil {
		return nil, fmt.Errorf("attach %s to interface %d: %w", hook, ifindex, err)
	}
	return l, nil
}

// tcxTargets reports whether l is a live tcx ingress link on ifindex (a link whose device
// was removed reports ifindex 0).
func tcxTargets(l link.Link, ifindex int) bool {
	info, err := l.Info()
	if err != nil {
		return false
	}
	tcx := info.TCX()
	return tcx != nil && int(tcx.Ifindex) == ifindex && ebpf.AttachType(tcx.AttachType) == ebpf.AttachTCXIngress
}

// DetachTC removes the program of hook from ifindex and its pin; detaching what is not
// attached is no error.
func (n *NodePort) DetachTC(ifindex int, hook TCHook) error {
	return detachTC(n.pinDir, ifindex, hook)
}

func detachTC(pinDir string, ifindex int, hook TCHook) error {
	return detachPinned(filepath.Join(pinDir, linksDir, tcPinName(hook, ifindex)))
}

// detachPinned detaches the link pinned at pin and removes the pin; a missing pin is no error.
func detachPinned(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned link %s: %w", pin, err)
	}
	defer l.Close()
	if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
		return fmt.Errorf("detach %s: %w", pin, err)
	}
	return removeIfExists(pin)
}

// TCAttachment is a pinned tcx link of the north-south datapath.
type TCAttachment struct {
	Hook    TCHook
	Ifindex int
	// ProgramID is the attached program; Defunct says the device is gone.
	ProgramID ebpf.ProgramID
	Defunct   bool
}

// TCAttached lists the pinned tcx links in pinDir, by hook and interface index.
func TCAttached(pinDir string) ([]TCAttachment, error) {
	entries, err := os.ReadDir(filepath.Join(pinDir, linksDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []TCAttachment
	for _, e := range entries {
		a, ok := parseTCPinName(e.Name())
		if !ok {
			continue
		}
		l, err := link.LoadPinnedLink(filepath.Join(pinDir, linksDir, e.Name()), nil)
		if err != nil {
			return nil, fmt.Errorf("open pinned link %s: %w", e.Name(), err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return nil, fmt.Errorf("pinned link %s: %w", e.Name(), err)
		}
		a.ProgramID = info.Program
		a.Defunct = info.TCX() == nil || int(info.TCX().Ifindex) != a.Ifindex
		out = append(out, a)
	}
	slices.SortFunc(out, func(a, b TCAttachment) int {
		if a.Ifindex != b.Ifindex {
			return a.Ifindex - b.Ifindex
		}
		return int(a.Hook) - int(b.Hook)
	})
	return out, nil
}

func parseTCPinName(name string) (TCAttachment, bool) {
	rest, ok := strings.CutPrefix(name, tcPinPrefix)
	if !ok {
		return TCAttachment{}, false
	}
	for _, h := range []TCHook{TCNodePort, TCReply} {
		idx, ok := strings.CutPrefix(rest, h.String()+"_")
		if !ok {
			continue
		}
		i, err := strconv.Atoi(idx)
		if err != nil || i <= 0 {
			return TCAttachment{}, false
		}
		return TCAttachment{Hook: h, Ifindex: i}, true
	}
	return TCAttachment{}, false
}

// XDPMode is how AttachXDP attaches the XDP program.
type XDPMode int

const (
	// XDPNative runs the program in the device's driver, before an skb exists. Fails on a
	// driver without native XDP.
	XDPNative XDPMode = iota
	// XDPGeneric runs it in the stack, after the skb is made: for tests, no faster than tc.
	XDPGeneric
)

func (m XDPMode) String() string {
	if m == XDPGeneric {
		return "generic"
	}
	return "native"
}

// xdpPinPrefix starts the names of pinned XDP links in linksDir: xdp_<ifindex>.
const xdpPinPrefix = "xdp_"

// AttachXDP attaches xdp_nodeport to the device with index ifindex in the caller's network
// namespace, through an XDP link pinned in the pin directory; a pinned link of the device is
// updated in place to the loaded program. The program does the common case of tc_nodeport and
// tc_nodeport_reply (a translated packet that leaves by the device it came in on) and passes
// everything else to them, so the tc programs must be attached to the device too.
func (n *NodePort) AttachXDP(ifindex int, mode XDPMode) error {
	if ifindex <= 0 {
		return fmt.Errorf("attach xdp_nodeport: invalid interface index %d", ifindex)
	}
	pin := n.xdpPin(ifindex)
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer old.Close()
		info, ierr := old.Info()
		if ierr == nil && info.XDP() != nil && int(info.XDP().Ifindex) == ifindex {
			if err := old.Update(n.objs.XdpNodeport); err == nil {
				return nil
			} else if !errors.Is(err, unix.ENOLINK) {
				return fmt.Errorf("update pinned link %s: %w", pin, err)
			}
		}
		// Defunct (the device is gone, or the mode changed): replaced below.
		if err := old.Unpin(); err != nil {
			return fmt.Errorf("unpin %s: %w", pin, err)
		}
		_ = old.Detach()
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open pinned link %s: %w", pin, err)
	}
	flags := link.XDPDriverMode
	if mode == XDPGeneric {
		flags = link.XDPGenericMode
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: n.objs.XdpNodeport, Interface: ifindex, Flags: flags})
	if err != nil {
		return fmt.Errorf("attach xdp_nodeport (%s) to interface %d: %w", mode, ifindex, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		l.Detach()
		return fmt.Errorf("pin xdp link %s: %w", pin, err)
	}
	return nil
}

// DetachXDP removes xdp_nodeport from ifindex and its pin; detaching what is not attached is
// no error.
func (n *NodePort) DetachXDP(ifindex int) error {
	return detachPinned(n.xdpPin(ifindex))
}

func (n *NodePort) xdpPin(ifindex int) string {
	return filepath.Join(n.pinDir, linksDir, fmt.Sprintf("%s%d", xdpPinPrefix, ifindex))
}

// XDPAttached lists the interface indexes with a pinned XDP link in pinDir, sorted.
func XDPAttached(pinDir string) ([]int, error) {
	entries, err := os.ReadDir(filepath.Join(pinDir, linksDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), xdpPinPrefix)
		if !ok {
			continue
		}
		if i, err := strconv.Atoi(rest); err == nil && i > 0 {
			out = append(out, i)
		}
	}
	slices.Sort(out)
	return out, nil
}
