package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Default map sizes (entries), used for the zero values of Config.
const (
	DefaultServiceMapSize       = 262144
	DefaultBackendMapSize       = 262144
	DefaultRevNatMapSize        = 65536
	DefaultSockRevNatMapSize    = 131072
	DefaultSockConnMapSize      = 131072
	DefaultAffinityMapSize      = 65536
	DefaultAffinityMatchMapSize = 65536
)

// sockConnSlotsVar is sock.c's constant that holds kpr_sk_conn_v1's size.
const sockConnSlotsVar = "sk_conn_slots"

// linksDir is where the cgroup links are pinned, below Config.PinDir.
const linksDir = "links"

// Config says where the datapath lives. Map sizes of 0 select the defaults.
type Config struct {
	// PinDir is a directory on a bpffs (e.g. /sys/fs/bpf/kpr) holding the
	// pinned maps and links; it is created if missing.
	PinDir string
	// CgroupPath is the cgroup v2 directory whose sockets are load-balanced.
	CgroupPath string

	ServiceMapSize    int
	BackendMapSize    int
	RevNatMapSize     int
	SockRevNatMapSize int
	// SockConnMapSize is the number of slots for live TCP and UDP sockets connected to a VIP
	// (kpr_sk_conn_v1), which keep their reverse translation outside the LRU map.
	SockConnMapSize int
	AffinityMapSize int
	// AffinityMatchMapSize bounds the (frontend, backend) pairs of all frontends with
	// session affinity together.
	AffinityMatchMapSize int

	// The north-south datapath (LoadNodePort); 0 selects the default.
	//
	// ConntrackMapSize is the number of flows it tracks (entries of kpr_lb_ct_v1, and as
	// many of its reverse NAT map kpr_lb_snat_v1).
	ConntrackMapSize int
	// MaglevMapSize is the number of frontends that can have a Maglev table.
	MaglevMapSize int
	// MaglevTableSize is the number of entries of every Maglev table (node/maglev's table
	// size, a prime).
	MaglevTableSize int
}

// mapSize ties a map to the Config field that sizes it, for error messages; field is empty
// for a map of fixed size.
type mapSize struct {
	mapName string
	field   string
	size    int
}

func (c Config) mapSizes() ([]mapSize, error) {
	sizes := []mapSize{
		{sockMapKprSvcV1, "ServiceMapSize", c.ServiceMapSize},
		{sockMapKprBackendsV1, "BackendMapSize", c.BackendMapSize},
		{sockMapKprRevnatV1, "RevNatMapSize", c.RevNatMapSize},
		{sockMapKprSkRevnatV1, "SockRevNatMapSize", c.SockRevNatMapSize},
		{sockMapKprSkConnV1, "SockConnMapSize", c.SockConnMapSize},
		{sockMapKprAffinityV1, "AffinityMapSize", c.AffinityMapSize},
		{sockMapKprAffinityMatchV1, "AffinityMatchMapSize", c.AffinityMatchMapSize},
	}
	defaults := []int{DefaultServiceMapSize, DefaultBackendMapSize, DefaultRevNatMapSize,
		DefaultSockRevNatMapSize, DefaultSockConnMapSize, DefaultAffinityMapSize, DefaultAffinityMatchMapSize}
	for i := range sizes {
		switch {
		case sizes[i].size < 0 || uint64(sizes[i].size) > math.MaxUint32:
			return nil, fmt.Errorf("config %s: %d is out of range (0 selects the default %d)",
				sizes[i].field, sizes[i].size, defaults[i])
		case sizes[i].size == 0:
			sizes[i].size = defaults[i]
		}
	}
	// Not configurable: listed so that a pinned map of another size or layout is reported.
	sizes = append(sizes, mapSize{sockMapKprSvcCidrsV1, "", MaxServiceCIDRs},
		mapSize{sockMapKprSkPeerV1, "", 0}, // socket storage: no size of its own
		mapSize{sockMapKprSkRevnatPortsV1, "", 1 << 16})
	return sizes, nil
}

// hook is one cgroup program and where it attaches. The release hook and the reverse
// translation hooks come first, so a socket is never translated forward while replies to it
// would not be translated back or its entry would outlive it.
type hook struct {
	name   string
	attach ebpf.AttachType
	prog   func(*sockPrograms) *ebpf.Program
}

var hooks = []hook{
	{sockProgSockRelease, ebpf.AttachCgroupInetSockRelease, func(p *sockPrograms) *ebpf.Program { return p.SockRelease }},
	{sockProgGetpeername4, ebpf.AttachCgroupInet4GetPeername, func(p *sockPrograms) *ebpf.Program { return p.Getpeername4 }},
	{sockProgGetpeername6, ebpf.AttachCgroupInet6GetPeername, func(p *sockPrograms) *ebpf.Program { return p.Getpeername6 }},
	{sockProgRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg, func(p *sockPrograms) *ebpf.Program { return p.Recvmsg4 }},
	{sockProgRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg, func(p *sockPrograms) *ebpf.Program { return p.Recvmsg6 }},
	{sockProgSendmsg4, ebpf.AttachCGroupUDP4Sendmsg, func(p *sockPrograms) *ebpf.Program { return p.Sendmsg4 }},
	{sockProgSendmsg6, ebpf.AttachCGroupUDP6Sendmsg, func(p *sockPrograms) *ebpf.Program { return p.Sendmsg6 }},
	{sockProgConnect4, ebpf.AttachCGroupInet4Connect, func(p *sockPrograms) *ebpf.Program { return p.Connect4 }},
	{sockProgConnect6, ebpf.AttachCGroupInet6Connect, func(p *sockPrograms) *ebpf.Program { return p.Connect6 }},
	{sockProgBind4, ebpf.AttachCGroupInet4Bind, func(p *sockPrograms) *ebpf.Program { return p.Bind4 }},
	{sockProgBind6, ebpf.AttachCGroupInet6Bind, func(p *sockPrograms) *ebpf.Program { return p.Bind6 }},
}

// Datapath is the loaded socket load balancer. Its programs stay attached
// after Close: the links are pinned.
type Datapath struct {
	Maps *LBMaps

	progs sockPrograms
	links []link.Link
}

// Probe checks that the kernel has what the socket load balancer needs and
// names the first missing feature.
func Probe() error {
	if err := features.HaveProgramType(ebpf.CGroupSockAddr); err != nil {
		return fmt.Errorf("kernel feature missing: BPF program type cgroup_sock_addr (Linux 4.17): %w", err)
	}
	helpers := []struct {
		fn   asm.BuiltinFunc
		desc string
	}{
		{asm.FnSetRetval, "helper bpf_set_retval for cgroup_sock_addr (Linux 5.18)"},
		{asm.FnGetSocketCookie, "helper bpf_get_socket_cookie for cgroup_sock_addr (Linux 5.0)"},
		{asm.FnGetNetnsCookie, "helper bpf_get_netns_cookie for cgroup_sock_addr (Linux 5.7)"},
		{asm.FnSkStorageGet, "helper bpf_sk_storage_get for cgroup_sock_addr (socket storage, for connected UDP sockets)"},
	}
	for _, h := range helpers {
		if err := features.HaveProgramHelper(ebpf.CGroupSockAddr, h.fn); err != nil {
			return fmt.Errorf("kernel feature missing: %s: %w", h.desc, err)
		}
	}
	// sock_release: cgroup_sock program type, attach type BPF_CGROUP_INET_SOCK_RELEASE (Linux
	// 5.9, with the cookie helper for it); the attach type itself is checked by attaching.
	if err := features.HaveProgramType(ebpf.CGroupSock); err != nil {
		return fmt.Errorf("kernel feature missing: BPF program type cgroup_sock (Linux 4.10): %w", err)
	}
	if err := features.HaveProgramHelper(ebpf.CGroupSock, asm.FnGetSocketCookie); err != nil {
		return fmt.Errorf("kernel feature missing: helper bpf_get_socket_cookie for cgroup_sock (Linux 5.9, for the sock_release hook): %w", err)
	}
	return nil
}

// Load loads the programs, reusing the maps pinned in cfg.PinDir so that
// Services survive a restart, and attaches them to cfg.CgroupPath through
// pinned links. An existing pinned link is updated in place to the new
// program, so a restart never leaves a window without translation.
func Load(cfg Config) (_ *Datapath, err error) {
	if cfg.PinDir == "" {
		return nil, fmt.Errorf("config PinDir: empty")
	}
	if cfg.CgroupPath == "" {
		return nil, fmt.Errorf("config CgroupPath: empty")
	}
	sizes, err := cfg.mapSizes()
	if err != nil {
		return nil, err
	}
	if err := checkBPFFS(cfg.PinDir); err != nil {
		return nil, fmt.Errorf("config PinDir: %w", err)
	}
	if err := checkCgroup2(cfg.CgroupPath); err != nil {
		return nil, fmt.Errorf("config CgroupPath: %w", err)
	}
	cgroupID, err := cgroupID(cfg.CgroupPath)
	if err != nil {
		return nil, fmt.Errorf("config CgroupPath: %w", err)
	}

	spec, err := loadSock()
	if err != nil {
		return nil, err
	}
	for _, s := range sizes {
		spec.Maps[s.mapName].MaxEntries = uint32(s.size)
	}
	// The programs pick a socket's slot in kpr_sk_conn_v1 by its size.
	if err := spec.Variables[sockConnSlotsVar].Set(spec.Maps[sockMapKprSkConnV1].MaxEntries); err != nil {
		return nil, fmt.Errorf("set %s: %w", sockConnSlotsVar, err)
	}

	if err := os.MkdirAll(filepath.Join(cfg.PinDir, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w", err)
	}
	if err := checkPinnedMaps(cfg.PinDir, spec, sizes); err != nil {
		return nil, err
	}

	// An older kpr's reverse entries have no port marks yet (seeded below).
	seedPorts := notPinned(cfg.PinDir, sockMapKprSkRevnatPortsV1)

	var objs sockObjects
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: cfg.PinDir}}
	if err := spec.LoadAndAssign(&objs, opts); err != nil {
		return nil, verboseError("load BPF objects", err)
	}
	d := &Datapath{Maps: newLBMaps(&objs.sockMaps), progs: objs.sockPrograms}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()

	for _, h := range hooks {
		l, err := attach(cfg, cgroupID, h, h.prog(&d.progs))
		if err != nil {
			return nil, fmt.Errorf("attach %s to %s: %w", h.name, cfg.CgroupPath, err)
		}
		d.links = append(d.links, l)
	}
	// After attaching: from here on only these programs write reverse entries, and they mark.
	if seedPorts {
		if err := seedSockRevNatPorts(d.Maps.sockRevNat, d.Maps.sockRevNatPorts); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// seedSockRevNatPorts marks the backend port of every entry of kpr_sk_revnat_v1: a kpr
// without kpr_sk_revnat_ports_v1 left entries that the reverse hooks would otherwise no
// longer look up (see the map in sock.c).
func seedSockRevNatPorts(revNat, ports *ebpf.Map) error {
	return seedPortMarks(revNat, ports, func(k *sockSkRevnatKey) uint16 { return k.Port },
		sockMapKprSkRevnatV1, sockMapKprSkRevnatPortsV1)
}

// notPinned reports whether pinDir holds no map called name: the loader will create it.
func notPinned(pinDir, name string) bool {
	_, err := os.Stat(filepath.Join(pinDir, name))
	return errors.Is(err, os.ErrNotExist)
}

// seedPortMarks sets to 1 the entry of the port array ports (named portsName) at the port
// portOf reads from each key of entries (named entriesName), the port as the packet or
// socket address carries it.
func seedPortMarks[K any](entries, ports *ebpf.Map, portOf func(*K) uint16, entriesName, portsName string) error {
	var (
		k    K
		v    = make([]byte, entries.ValueSize())
		seen = map[uint16]bool{}
	)
	it := entries.Iterate()
	for it.Next(&k, &v) {
		port := portOf(&k)
		if seen[port] {
			continue
		}
		seen[port] = true
		if err := ports.Update(uint32(port), uint8(1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("update %s: %w", portsName, err)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("seed %s from %s: %w", portsName, entriesName, err)
	}
	return nil
}

// attach points the pinned link of h at prog, creating (and pinning) the link
// if there is none usable.
func attach(cfg Config, cgroupID uint64, h hook, prog *ebpf.Program) (link.Link, error) {
	pin := filepath.Join(cfg.PinDir, linksDir, h.name)
	old, err := link.LoadPinnedLink(pin, nil)
	switch {
	case errors.Is(err, os.ErrNotExist):
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cfg.CgroupPath, Attach: h.attach, Program: prog})
		if err != nil {
			return nil, err
		}
		if err := l.Pin(pin); err != nil {
			l.Close()
			return nil, fmt.Errorf("pin link: %w", err)
		}
		return l, nil
	case err != nil:
		return nil, fmt.Errorf("open pinned link %s: %w", pin, err)
	}

	if linkTargets(old, cgroupID, h.attach) {
		err := old.Update(prog)
		if err == nil {
			return old, nil
		}
		// ENOLINK: the cgroup went away under the link; replace it below.
		if !errors.Is(err, unix.ENOLINK) {
			old.Close()
			return nil, fmt.Errorf("update pinned link %s: %w", pin, err)
		}
	}

	// The pinned link is attached elsewhere (CgroupPath changed) or is
	// defunct: attach anew, atomically replace the pin, then detach the old.
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cfg.CgroupPath, Attach: h.attach, Program: prog})
	if err != nil {
		old.Close()
		return nil, err
	}
	// bpffs reserves names with dots.
	tmp := pin + "_new"
	_ = os.Remove(tmp)
	if err := l.Pin(tmp); err != nil {
		l.Close()
		old.Close()
		return nil, fmt.Errorf("pin link: %w", err)
	}
	if err := os.Rename(tmp, pin); err != nil {
		_ = os.Remove(tmp)
		l.Close()
		old.Close()
		return nil, fmt.Errorf("replace pinned link %s: %w", pin, err)
	}
	if err := old.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
		old.Close()
		return l, fmt.Errorf("detach replaced link %s: %w", pin, err)
	}
	old.Close()
	return l, nil
}

// linkTargets reports whether l is a cgroup link of the given attach type on
// the given cgroup.
func linkTargets(l link.Link, cgroupID uint64, at ebpf.AttachType) bool {
	info, err := l.Info()
	if err != nil {
		return false
	}
	cg := info.Cgroup()
	if cg == nil {
		return false
	}
	return cg.CgroupId == cgroupID && ebpf.AttachType(cg.AttachType) == at
}

// checkPinnedMaps turns an incompatible pinned map into an error that names
// the map and the Config field, before the loader reports a generic one.
func checkPinnedMaps(pinDir string, spec *ebpf.CollectionSpec, sizes []mapSize) error {
	for _, s := range sizes {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, s.mapName), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("open pinned map %s: %w", s.mapName, err)
		}
		ms := spec.Maps[s.mapName]
		err = ms.Compatible(m)
		pinnedEntries := m.MaxEntries()
		m.Close()
		if err == nil {
			continue
		}
		if s.field == "" {
			return fmt.Errorf("pinned map %s in %s is incompatible (%v): it was created by an incompatible kpr version; remove it with `kpr cleanup`",
				s.mapName, pinDir, err)
		}
		if pinnedEntries != ms.MaxEntries {
			return fmt.Errorf("pinned map %s in %s has %d entries but config %s is %d: set %s to %d, or remove the datapath with `kpr cleanup` to resize (drops all Services until the next sync)",
				s.mapName, pinDir, pinnedEntries, s.field, s.size, s.field, pinnedEntries)
		}
		return fmt.Errorf("pinned map %s in %s has an incompatible layout (%v), config %s: it was created by an incompatible kpr version; remove it with `kpr cleanup`",
			s.mapName, pinDir, err, s.field)
	}
	return nil
}

// verboseError keeps the whole verifier log in the message (%+v), which the
// default formatting of a wrapped VerifierError would cut to its last line.
func verboseError(what string, err error) error {
	var verr *ebpf.VerifierError
	if errors.As(err, &verr) {
		return fmt.Errorf("%s: %w\nverifier log:\n%+v", what, err, verr)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// Close releases the file descriptors. The pins, and so the attachment and
// the map contents, stay: stopping kpr never tears down the datapath.
func (d *Datapath) Close() error {
	var errs []error
	for _, l := range d.links {
		errs = append(errs, l.Close())
	}
	d.links = nil
	errs = append(errs, d.progs.Close())
	if d.Maps != nil {
		errs = append(errs, d.Maps.Close())
	}
	return errors.Join(errs...)
}

// Attached returns the names of the programs whose links are pinned in
// pinDir, sorted.
func Attached(pinDir string) ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(pinDir, linksDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if slices.ContainsFunc(hooks, func(h hook) bool { return h.name == e.Name() }) {
			names = append(names, e.Name())
		}
	}
	slices.Sort(names)
	return names, nil
}

// RunStats returns the kernel's run-time statistics of each program whose link is pinned in
// pinDir, by program name for the socket hooks and by link name for the tc and XDP programs:
// how often it ran and for how long in total. A program attached through several links (the
// same tc program on many devices) is one program to the kernel, with one count: it appears
// once, under the name of the first of its links in name order. The kernel counts only while
// statistics are enabled (ebpf.EnableStats, or the kernel.bpf_stats_enabled sysctl);
// otherwise both stay 0.
func RunStats(pinDir string) (map[string]ebpf.ProgramStats, error) {
	names, err := Attached(pinDir)
	if err != nil {
		return nil, err
	}
	// The north-south programs, by their links' names (tcx_<hook>_<ifindex>, xdp_<ifindex>).
	entries, err := os.ReadDir(filepath.Join(pinDir, linksDir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tcPinPrefix) || strings.HasPrefix(e.Name(), xdpPinPrefix) {
			names = append(names, e.Name())
		}
	}
	out := make(map[string]ebpf.ProgramStats, len(names))
	seen := map[ebpf.ProgramID]bool{}
	for _, name := range names {
		id, st, err := linkStats(filepath.Join(pinDir, linksDir, name))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if seen[id] {
			continue
		}
		seen[id] = true
		out[name] = *st
	}
	return out, nil
}

// linkStats is the program behind the link pinned at pin, and its statistics.
func linkStats(pin string) (ebpf.ProgramID, *ebpf.ProgramStats, error) {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return 0, nil, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return 0, nil, err
	}
	prog, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		return 0, nil, err
	}
	defer prog.Close()
	st, err := prog.Stats()
	return info.Program, st, err
}

// Cleanup detaches and unpins the links (cgroup and tcx), unpins the maps of both the socket
// and the north-south datapath and removes pinDir.
// It is what `kpr cleanup` runs; calling it again is a no-op.
func Cleanup(pinDir string) error {
	if _, err := os.Stat(pinDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	// Never unlink anything outside a bpffs, whatever path we were given.
	if err := checkBPFFS(pinDir); err != nil {
		return fmt.Errorf("cleanup %s: %w", pinDir, err)
	}

	var errs []error
	ldir := filepath.Join(pinDir, linksDir)
	entries, err := os.ReadDir(ldir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	for _, e := range entries {
		p := filepath.Join(ldir, e.Name())
		if l, err := link.LoadPinnedLink(p, nil); err == nil {
			// Detach explicitly: a running kpr may still hold the link open.
			if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
				errs = append(errs, fmt.Errorf("detach %s: %w", p, err))
			}
			l.Close()
		}
		errs = append(errs, removeIfExists(p))
	}
	errs = append(errs, removeIfExists(ldir))
	for _, name := range slices.Concat(mapNames, lbMapNames) {
		errs = append(errs, removeIfExists(filepath.Join(pinDir, name)))
	}
	if err := removeIfExists(pinDir); err != nil {
		left, _ := os.ReadDir(pinDir)
		var names []string
		for _, e := range left {
			names = append(names, e.Name())
		}
		errs = append(errs, fmt.Errorf("%w (left: %s)", err, strings.Join(names, ", ")))
	}
	return errors.Join(errs...)
}

func removeIfExists(p string) error {
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// checkBPFFS verifies that path, or its nearest existing parent if it does
// not exist yet, is on a bpffs.
func checkBPFFS(path string) error {
	p := filepath.Clean(path)
	for {
		_, err := os.Stat(p)
		if err == nil {
			break
		}
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
		parent := filepath.Dir(p)
		if parent == p {
			break
		}
		p = parent
	}
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", p, err)
	}
	if uint32(st.Type) != unix.BPF_FS_MAGIC {
		return fmt.Errorf("%s is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)", path)
	}
	return nil
}

func checkCgroup2(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", path, err)
	}
	if uint32(st.Type) != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not a cgroup v2 directory", path)
	}
	return nil
}

// cgroupID is the kernel's ID of a cgroup v2 directory, as link info reports
// it: the kernfs file handle.
func cgroupID(path string) (uint64, error) {
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, path, 0)
	if err != nil {
		return 0, fmt.Errorf("cgroup ID of %s: %w", path, err)
	}
	b := h.Bytes()
	if len(b) < 8 {
		return 0, fmt.Errorf("cgroup ID of %s: short file handle", path)
	}
	return binary.NativeEndian.Uint64(b[:8]), nil
}
