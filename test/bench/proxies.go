package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/node/agent"
	"github.com/kpr-dev/kpr/test/sandbox"
)

// Bounds on proxy housekeeping.
const (
	cleanupTimeout = 3 * time.Minute
	kprStopTimeout = 30 * time.Second
	execTimeout    = 30 * time.Second
)

// runKpr: `kpr cleanup` (a fresh pin directory), the poller, `kpr run` (with acceleration
// native for KprXDP), then the measurements, then stop and clean up again. The ClusterIP
// scenario's client runs in kpr's cgroup, where the socket hooks translate its connect(); the
// NodePort scenario's is outside the cluster, and kpr's tc (and XDP) programs on node1's eth0
// serve it.
func (b *bench) runKpr(ctx context.Context, run *PathRun) (err error) {
	b.kpr.Env = nil
	if run.Path == KprXDP {
		b.kpr.Env = []string{"KPR_ACCELERATION=native"}
	}
	clientFD := b.kpr.CgroupFD
	if b.cfg.Scenario == NodePort {
		clientFD = b.plain.FD
	}
	if out, err := b.kpr.Run(ctx, "cleanup"); err != nil {
		return fmt.Errorf("kpr cleanup: %w: %s", err, out)
	}
	defer func() {
		if serr := b.kpr.Stop(); serr != nil {
			err = errors.Join(err, fmt.Errorf("stopping kpr: %w", serr))
		}
		cctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		if out, cerr := b.kpr.Run(cctx, "cleanup"); cerr != nil {
			err = errors.Join(err, fmt.Errorf("kpr cleanup: %w: %s", cerr, out))
		}
	}()
	limit := b.cfg.firstAnswerLimit(run.Path)
	poller, err := b.startPoller(ctx, clientFD, limit)
	if err != nil {
		return err
	}
	defer poller.Kill()
	started := time.Now()
	startErr := b.kpr.Start(ctx, limit)
	if startErr == nil {
		run.SyncedSeconds = time.Since(started).Seconds()
	}
	if err := b.waitFirstAnswer(ctx, poller, started, limit, run); err != nil {
		return err
	}
	if startErr != nil {
		run.Notes = append(run.Notes, fmt.Sprintf("kpr did not sync: %v", startErr))
		return ctx.Err()
	}
	if b.kpr.Proc != nil {
		run.proxyPID = b.kpr.Proc.Pid()
		run.MemAfterSync = readMem(run.proxyPID)
	}
	if st, err := agent.ReadStatus(b.kpr.RunDir); err == nil {
		run.Programmed = fmt.Sprintf("%d frontends, %d backends, last sync took %s", st.Frontends, st.Backends, st.LastSyncDuration)
		if b.cfg.Scenario == NodePort {
			run.Programmed += "; " + st.NorthSouth
			if run.Path == KprXDP && !strings.Contains(st.NorthSouth, "XDP: eth0 native") {
				return fmt.Errorf("kpr does not run XDP natively on eth0: %s", st.NorthSouth)
			}
		}
	}
	run.MapMemlock = pinnedMapMemlock(ctx, b.kpr.PinDir)
	b.countNftRules(ctx, run)
	if !run.Answered {
		return ctx.Err()
	}
	// kpr and direct in turn while kpr runs, in pairs whose order alternates (kpr first, then
	// direct first, ...): the direct client runs in a cgroup without kpr's programs, so its path
	// is the floor. A comparison within a few percent needs both sides measured on the same
	// machine within seconds; alternating the order cancels the advantage of going second.
	for i := range b.cfg.Pairs {
		p, err := b.measurePair(ctx, clientSpec{path: run.Path, cgroupFD: clientFD, targets: []string{b.svcTarget}}, i%2 == 1, run)
		run.Pairs = append(run.Pairs, p)
		if err != nil {
			return err
		}
	}
	// The control: the same measurement with a direct client on both sides, in the same run.
	if b.cfg.Scenario == ClusterIP {
		for i := range b.cfg.ControlPairs {
			p, err := b.measurePair(ctx, clientSpec{path: DirectControl, cgroupFD: b.plain.FD, targets: b.podTargets()}, i%2 == 1, run)
			run.ControlPairs = append(run.ControlPairs, p)
			if err != nil {
				return err
			}
		}
	}
	if b.cfg.Scenario == NodePort {
		b.northSouthCounters(run)
	}
	if b.kpr.Proc != nil {
		b.fullSync(ctx, run)
		run.MemAfterTraffic = readMem(b.kpr.Proc.Pid())
	}
	return nil
}

// northSouthCounters records what kpr's tc and XDP programs counted over the run, to show that
// the traffic took the path the run is named after (XDP: nearly every packet sent by XDP).
func (b *bench) northSouthCounters(run *PathRun) {
	m, err := bpf.OpenNodePortMaps(b.kpr.PinDir)
	if err != nil {
		run.Notes = append(run.Notes, fmt.Sprintf("north-south counters: %v", err))
		return
	}
	defer m.Close()
	st, err := m.Stats()
	if err != nil {
		run.Notes = append(run.Notes, fmt.Sprintf("north-south counters: %v", err))
		return
	}
	run.NorthSouth = &NorthSouthCounters{Flows: st.NewFlows, Forwarded: st.Forwarded, Replies: st.Replies, XDPTx: st.XDPTx,
		Other: otherCounters(st)}
}

// otherCounters are st's counters besides flows, forwarded, replies and XDP_TX that are not
// zero, by field name.
func otherCounters(st bpf.NodePortStats) map[string]uint64 {
	out := map[string]uint64{}
	v := reflect.ValueOf(st)
	for i := range v.NumField() {
		switch name := v.Type().Field(i).Name; name {
		case "NewFlows", "Forwarded", "Replies", "XDPTx":
		default:
			if n := v.Field(i).Uint(); n != 0 {
				out[name] = n
			}
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// fullSyncTimeout bounds the wait for the full sync fullSync asks for.
const fullSyncTimeout = time.Minute

// fullSync makes kpr do its periodic full sync now (SIGHUP), every Service recomputed and the
// maps checked, and waits for it, so that the memory read next includes its peak: by default
// it comes once an hour, never inside a run.
func (b *bench) fullSync(ctx context.Context, run *PathRun) {
	asked := time.Now()
	if err := b.kpr.Proc.Signal(syscall.SIGHUP); err != nil {
		run.Notes = append(run.Notes, fmt.Sprintf("full sync not requested: %v", err))
		return
	}
	deadline := time.Now().Add(fullSyncTimeout)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if st, err := agent.ReadStatus(b.kpr.RunDir); err == nil && st.LastFullSync.After(asked) {
			run.FullSync = fmt.Sprintf("took %s", st.LastSyncDuration)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	run.Notes = append(run.Notes, fmt.Sprintf("no full sync within %s of SIGHUP", fullSyncTimeout))
}

// kubeProxyArgs run kube-proxy in the node namespace as kubeadm's DaemonSet would, except that
// nothing global is touched: no nf_conntrack_max / hashsize (global), no conntrack timeouts,
// no OOM score below 0. Metrics and health listen on the node's own address.
func (b *bench) kubeProxyArgs(mode string) []string {
	return []string{
		"--kubeconfig=" + b.node.KubeletConf(),
		"--hostname-override=" + b.node.Name,
		"--proxy-mode=" + mode,
		"--cluster-cidr=" + sandbox.PodSubnet,
		"--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0",
		"--conntrack-tcp-timeout-close-wait=0",
		"--metrics-bind-address=" + target(b.node.IPv4, 10249),
		"--healthz-bind-address=" + target(b.node.IPv4, 10256),
		"--oom-score-adj=0",
		"--v=2",
	}
}

// runKubeProxy: the poller outside kpr's cgroup, kube-proxy in the node namespace, the
// measurements, then SIGTERM, `kube-proxy --cleanup` and an empty ruleset again.
func (b *bench) runKubeProxy(ctx context.Context, mode string, run *PathRun) (err error) {
	path := KubeProxyNFTables
	if mode == "iptables" {
		path = KubeProxyIPTables
	}
	limit := b.cfg.firstAnswerLimit(path)
	poller, err := b.startPoller(ctx, b.plain.FD, limit)
	if err != nil {
		return err
	}
	defer poller.Kill()
	started := time.Now()
	kp, err := b.node.StartCmd(ctx, sandbox.Cmd{Name: b.kubeProxy, Args: b.kubeProxyArgs(mode)})
	if err != nil {
		return fmt.Errorf("starting kube-proxy: %w", err)
	}
	defer func() {
		if serr := kp.Stop(); serr != nil {
			err = errors.Join(err, fmt.Errorf("stopping kube-proxy: %w", serr))
		}
		run.Notes = append(run.Notes, globalStateLines(kp.LogPath)...)
		if cerr := b.cleanupNode(context.Background()); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	if err := b.waitFirstAnswer(ctx, poller, started, limit, run); err != nil {
		return err
	}
	if kp.Exited() {
		return fmt.Errorf("kube-proxy exited: %s", kp.LogTail(2000))
	}
	run.proxyPID = kp.Pid()
	run.MemAfterSync = readMem(run.proxyPID)
	if !run.Answered {
		run.Notes = append(run.Notes, "kube-proxy's last log lines: "+lastLines(kp.LogTail(4000), 3))
		return ctx.Err()
	}
	if path == KubeProxyNFTables {
		b.countNftRules(ctx, run)
	}
	if err := b.measure(ctx, path, b.plain.FD, []string{b.svcTarget}, run); err != nil {
		return err
	}
	run.MemAfterTraffic = readMem(kp.Pid())
	return nil
}

// cleanupNode is what an admin switching proxies does: `kube-proxy --cleanup` in the node
// namespace. Then the node's ruleset is flushed (it is the benchmark's own namespace) and must be
// empty, and conntrack is flushed, so the next path starts from nothing.
func (b *bench) cleanupNode(ctx context.Context) error {
	var errs []error
	if b.kubeProxy != "" {
		cctx, cancel := context.WithTimeout(ctx, cleanupTimeout)
		out, err := b.node.Exec(cctx, 0, b.kubeProxy, "--cleanup", "--v=0")
		cancel()
		if err != nil {
			b.log("  kube-proxy --cleanup: %v: %s", err, lastLines(string(out), 3))
		}
	}
	if out, err := b.nodeCmd(ctx, "nft", "flush", "ruleset"); err != nil {
		errs = append(errs, fmt.Errorf("nft flush ruleset in %s: %w: %s", b.node.NS, err, out))
	}
	if rules, err := b.nodeCmd(ctx, "nft", "list", "ruleset"); err != nil || strings.TrimSpace(rules) != "" {
		errs = append(errs, fmt.Errorf("the ruleset of %s is not empty after cleanup: %v\n%s", b.node.NS, err, rules))
	}
	if err := b.flushConntrack(ctx); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (b *bench) flushConntrack(ctx context.Context) error {
	if out, err := b.nodeCmd(ctx, "conntrack", "-F"); err != nil {
		return fmt.Errorf("conntrack -F in %s: %w: %s", b.node.NS, err, out)
	}
	return nil
}

// countNftRules records how many rules the node namespace's nftables ruleset holds.
func (b *bench) countNftRules(ctx context.Context, run *PathRun) {
	out, err := b.nodeCmd(ctx, "nft", "-j", "list", "ruleset")
	if err != nil {
		run.Notes = append(run.Notes, fmt.Sprintf("nft -j list ruleset: %v", err))
		return
	}
	var rs struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &rs); err != nil {
		run.Notes = append(run.Notes, fmt.Sprintf("nft -j list ruleset: %v", err))
		return
	}
	for _, o := range rs.Nftables {
		if _, ok := o["rule"]; ok {
			run.NftRules++
		}
	}
	run.HasNftRules = true
}

// nodeCmd runs a short command in the node namespace.
func (b *bench) nodeCmd(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, execTimeout)
	defer cancel()
	out, err := b.node.Exec(ctx, 0, name, args...)
	return string(out), err
}

// checkClean refuses to measure a path while another one could still be in the way: kpr must
// be stopped with nothing attached to its cgroup, and the node's ruleset empty.
func (b *bench) checkClean(ctx context.Context) error {
	var errs []error
	if b.kpr.Proc != nil {
		errs = append(errs, errors.New("kpr is running"))
	}
	if out, err := hostCmd(ctx, "bpftool", "-j", "cgroup", "show", b.kpr.Cgroup); err != nil {
		errs = append(errs, fmt.Errorf("bpftool cgroup show: %w", err))
	} else {
		// Nothing attached prints nothing (or "[]").
		var progs []json.RawMessage
		if trimmed := strings.TrimSpace(out); trimmed != "" {
			if err := json.Unmarshal([]byte(trimmed), &progs); err != nil {
				errs = append(errs, fmt.Errorf("bpftool cgroup show: %w: %s", err, out))
			}
		}
		if len(progs) > 0 {
			errs = append(errs, fmt.Errorf("programs still attached to %s: %s", b.kpr.Cgroup, out))
		}
	}
	if rules, err := b.nodeCmd(ctx, "nft", "list", "ruleset"); err != nil || strings.TrimSpace(rules) != "" {
		errs = append(errs, fmt.Errorf("the ruleset of %s is not empty: %v\n%s", b.node.NS, err, rules))
	}
	if b.cfg.Scenario == NodePort {
		// kpr's tc programs hang on pinned links, which `kpr cleanup` removed with the pin
		// directory; an XDP program would show on the device.
		if _, err := os.Stat(b.kpr.PinDir); !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("kpr's pin directory %s is still there (%v)", b.kpr.PinDir, err))
		}
		if out, err := b.nodeCmd(ctx, "ip", "-d", "link", "show", "dev", "eth0"); err != nil || strings.Contains(out, "prog/xdp") {
			errs = append(errs, fmt.Errorf("eth0 of %s still has an XDP program (%v): %s", b.node.NS, err, out))
		}
	}
	return errors.Join(errs...)
}

// globalStateRE matches kube-proxy log lines about settings outside its own namespace (or that
// look like it): conntrack limits, hash size, sysctls, OOM score.
var globalStateRE = regexp.MustCompile(`(?i)(nf_conntrack_max|hashsize|sysctl|oom)`)

// globalStateLines returns kube-proxy's log lines about sysctls and other settings, so the
// report can show that nothing outside its namespace was changed.
func globalStateLines(logPath string) []string {
	data, err := os.ReadFile(logPath)
	if err != nil {
		return nil
	}
	var out []string
	seen := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n") {
		if !globalStateRE.MatchString(line) || strings.Contains(line, "FLAG: --") {
			continue
		}
		// Drop the klog header (severity, time, pid, file:line).
		msg := line
		if _, rest, ok := strings.Cut(line, "] "); ok {
			msg = rest
		}
		if !seen[msg] && len(out) < 10 {
			seen[msg] = true
			if strings.Contains(msg, "net/") {
				msg += " (a net/ sysctl: the node namespace's own)"
			}
			out = append(out, "kube-proxy log: "+msg)
		}
	}
	return out
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// pinnedMapMemlock sums bpftool's bytes_memlock over the maps pinned in dir: the kernel memory
// kpr's maps hold, which VmRSS does not show.
func pinnedMapMemlock(ctx context.Context, dir string) int64 {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var total int64
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		out, err := hostCmd(ctx, "bpftool", "-j", "map", "show", "pinned", filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var m struct {
			Memlock int64 `json:"bytes_memlock"`
		}
		if json.Unmarshal([]byte(out), &m) == nil {
			total += m.Memlock
		}
	}
	return total
}
