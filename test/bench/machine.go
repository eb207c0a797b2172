package bench

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Machine describes where the figures come from.
type Machine struct {
	CPUs      int     `json:"cpus"` // usable by this process (nproc)
	CPUModel  string  `json:"cpu_model"`
	Virtual   bool    `json:"virtual"` // the CPU flags say "hypervisor"
	MemoryGiB float64 `json:"memory_gib"`
	Kernel    string  `json:"kernel"`
	OS        string  `json:"os"`
	Go        string  `json:"go"`
	Load1     float64 `json:"load1_at_start"`
}

func describeMachine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), Load1: load1()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if !ok {
				continue
			}
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			if k == "model name" && m.CPUModel == "" {
				m.CPUModel = v
			}
			if k == "flags" && strings.Contains(" "+v+" ", " hypervisor ") {
				m.Virtual = true
			}
		}
		f.Close()
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				f := strings.Fields(rest)
				if kb, err := strconv.ParseFloat(f[0], 64); err == nil {
					m.MemoryGiB = kb / (1 << 20)
				}
			}
		}
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if data, err := os.ReadFile("/etc/os-release"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "PRETTY_NAME="); ok {
				m.OS = strings.Trim(v, `"`)
			}
		}
	}
	return m
}

// KV is one named version.
type KV struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

func toolVersions(ctx context.Context, kubeProxy string) []KV {
	first := func(name string, args ...string) string {
		out, err := hostCmd(ctx, name, args...)
		if err != nil {
			return "not found"
		}
		return strings.TrimSpace(strings.SplitN(out, "\n", 2)[0])
	}
	kv := []KV{}
	if kubeProxy != "" {
		kv = append(kv, KV{"kube-proxy", first(kubeProxy, "--version")})
	}
	return append(kv,
		KV{"iptables", first("iptables", "-V")},
		KV{"nft", first("nft", "--version")},
		KV{"conntrack", first("conntrack", "--version")},
	)
}

// hostCmd runs a short read-only command in the benchmark's own (root) namespace.
func hostCmd(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, execTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func load1() float64 {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return -1
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return v
}

// foreignNetns counts the named network namespaces that are not this run's: other test runs
// sharing the machine (and its two CPUs).
func foreignNetns(prefix string) int {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), prefix) {
			n++
		}
	}
	return n
}

// rootState is what this benchmark must not change in the root network namespace.
type rootState map[string]string

// rootFiles are global or root-namespace settings kube-proxy is known to write when allowed to.
var rootFiles = []string{
	"/proc/sys/net/netfilter/nf_conntrack_max",
	"/sys/module/nf_conntrack/parameters/hashsize",
	"/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
	"/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait",
	"/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal",
	"/proc/sys/net/ipv4/conf/all/route_localnet",
	"/proc/sys/net/ipv4/ip_forward",
	"/proc/sys/net/ipv6/conf/all/forwarding",
	"/proc/sys/net/bridge/bridge-nf-call-iptables",
}

// volatile strips counters that change on their own (address lifetimes, route expiry).
var volatile = regexp.MustCompile(`(valid_lft|preferred_lft|expires) \S+`)

func snapshotRoot(ctx context.Context) rootState {
	s := rootState{}
	for _, f := range rootFiles {
		if data, err := os.ReadFile(f); err == nil {
			s[f] = strings.TrimSpace(string(data))
		}
	}
	for _, c := range [][]string{
		{"ip", "-o", "link", "show"},
		{"ip", "-o", "addr", "show"},
		{"ip", "route", "show", "table", "all"},
		{"ip", "-6", "route", "show", "table", "all"},
		{"nft", "list", "ruleset"},
	} {
		out, err := hostCmd(ctx, c[0], c[1:]...)
		if err != nil {
			out = "error: " + err.Error()
		}
		s[strings.Join(c, " ")] = volatile.ReplaceAllString(out, "$1")
	}
	return s
}

// diff names what changed between two snapshots.
func (s rootState) diff(after rootState) []string {
	var keys []string
	for k := range s {
		keys = append(keys, k)
	}
	for k := range after {
		if _, ok := s[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var out []string
	for _, k := range keys {
		if s[k] != after[k] {
			out = append(out, fmt.Sprintf("%s: %q -> %q", k, truncate(s[k], 200), truncate(after[k], 200)))
		}
	}
	return out
}

// leftovers lists what a run with this prefix could have left behind: network namespaces,
// cgroups under the cgroup2 mount and bpffs mounts under the work directory.
func leftovers(prefix, workDir string) []string {
	var left []string
	if entries, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), prefix) {
				left = append(left, "netns "+e.Name())
			}
		}
	}
	if data, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			pre, post, ok := strings.Cut(line, " - ")
			f, pf := strings.Fields(pre), strings.Fields(post)
			if !ok || len(f) < 5 || len(pf) < 1 {
				continue
			}
			mnt := f[4]
			if pf[0] == "cgroup2" {
				if matches, _ := filepath.Glob(filepath.Join(mnt, prefix+"*")); len(matches) > 0 {
					left = append(left, matches...)
				}
			}
			if pf[0] == "bpf" && workDir != "" && strings.HasPrefix(mnt, workDir) {
				left = append(left, "bpffs "+mnt)
			}
		}
	}
	return left
}

// cpuMeter tells how much CPU processes outside the benchmark used while a measurement ran:
// other test runs share the machine, and a measurement they disturbed shows it. It adds up,
// for every process outside the sandbox (not the benchmark, its parent or kernel threads), the
// user and system time it and its reaped children used in between, plus the hypervisor's steal
// time. A child reaped in between brings all of its time at once (a finished test binary can
// bring minutes), so each process counts for at most the whole window: such a measurement is
// simply taken again. Processes that started and ended in between without a parent outside the
// sandbox are missed. (The machine-wide busy time minus the sandbox's cannot be used: the
// kernel accounts softirq time to tasks and to the CPU differently, by a quarter here.)
type cpuMeter struct {
	ours func() map[uint64]bool // network namespace inodes of the sandbox
	self int
}

type cpuSnapshot struct {
	at     time.Time
	uptime uint64 // ticks since boot
	steal  uint64 // ticks the hypervisor gave to someone else
	busy   uint64 // ticks all CPUs spent on user, system, irq and softirq work
	others map[int]procTicks
}

type procTicks struct {
	start uint64 // start time, ticks since boot
	used  uint64 // utime+stime+cutime+cstime
}

// pfKthread marks kernel threads in /proc/<pid>/stat's flags.
const pfKthread = 0x00200000

// clkTck is USER_HZ, the unit of /proc/stat and /proc/<pid>/stat.
const clkTck = 100

func (m *cpuMeter) snapshot() cpuSnapshot {
	s := cpuSnapshot{others: map[int]procTicks{}}
	s.at, s.busy, s.steal = busyNow()
	if data, err := os.ReadFile("/proc/uptime"); err == nil {
		if f := strings.Fields(string(data)); len(f) > 0 {
			v, _ := strconv.ParseFloat(f[0], 64)
			s.uptime = uint64(v * clkTck)
		}
	}
	ours := m.ours()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return s
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == m.self || pid == os.Getppid() {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) == nil && ours[st.Ino] {
			continue
		}
		f := procStat(pid)
		if len(f) < 20 {
			continue
		}
		field := func(i int) uint64 { v, _ := strconv.ParseUint(f[i], 10, 64); return v }
		// f[0] is field 3 (state): flags is field 9, utime..cstime 14..17, starttime 22.
		if field(6)&pfKthread != 0 {
			continue
		}
		s.others[pid] = procTicks{start: field(19), used: field(11) + field(12) + field(13) + field(14)}
	}
	return s
}

// busyNow reads the time and, from /proc/stat, the ticks all CPUs spent working (user, nice,
// system, irq, softirq) and the hypervisor's steal: the cheap part of a snapshot.
func busyNow() (at time.Time, busy, steal uint64) {
	at = time.Now()
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return at, 0, 0
	}
	// cpu  user nice system idle iowait irq softirq steal ...
	if f := strings.Fields(strings.SplitN(string(data), "\n", 2)[0]); len(f) > 8 && f[0] == "cpu" {
		steal, _ = strconv.ParseUint(f[8], 10, 64)
		for _, i := range []int{1, 2, 3, 6, 7} {
			v, _ := strconv.ParseUint(f[i], 10, 64)
			busy += v
		}
	}
	return at, busy, steal
}

// procStat returns the fields of /proc/<pid>/stat after the command name.
func procStat(pid int) []string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(data[i+1:]))
}

// othersShare is the fraction of the machine's CPU time that others used between two
// snapshots (see cpuMeter).
func othersShare(a, b cpuSnapshot) float64 {
	window := b.at.Sub(a.at).Seconds() * float64(runtime.NumCPU()) * clkTck
	if window <= 0 {
		return 0
	}
	var ticks float64
	if b.steal >= a.steal {
		ticks += float64(b.steal - a.steal)
	}
	for pid, p := range b.others {
		var used uint64
		if p0, ok := a.others[pid]; ok && p0.start == p.start {
			if p.used >= p0.used {
				used = p.used - p0.used
			}
		} else if p.start+1 >= a.uptime {
			used = p.used // started in between
		}
		ticks += min(float64(used), window)
	}
	return min(ticks/window, 1)
}
