// Package config holds kpr's one configuration struct. Every setting has a YAML key in
// /etc/kpr/kpr.yaml, a command-line flag and a KPR_* environment variable; precedence is
// flag > environment > file > default. Validation happens once, at start, and every error
// names the key it is about.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/kpr-dev/kpr/node/lbstate"
	"github.com/kpr-dev/kpr/node/maglev"
)

// DefaultMaglevSeed seeds the Maglev hashes unless maglevSeed is set. It is the same on every
// node, which is all that consistency needs; a cluster may set its own.
const DefaultMaglevSeed = "a3ByLW1hZ2xldi0x" // "kpr-maglev-1"

// DefaultFile is where packages install the configuration.
const DefaultFile = "/etc/kpr/kpr.yaml"

// Config is kpr's configuration. The mapstructure tag is the YAML key.
type Config struct {
	// Finding the API server (see package kubeadm).
	Kubeconfig        string   `mapstructure:"kubeconfig"`
	KubeletKubeconfig string   `mapstructure:"kubeletKubeconfig"`
	KubeadmConfig     string   `mapstructure:"kubeadmConfig"`
	APIServers        []string `mapstructure:"apiServers"`

	NodeName string `mapstructure:"nodeName"`

	// Cluster networking; empty means "take it from the kubeadm files".
	ServiceCIDRs []string `mapstructure:"serviceCIDRs"`
	ClusterCIDR  []string `mapstructure:"clusterCIDR"`

	// Datapath.
	CgroupPath        string `mapstructure:"cgroupPath"`
	BPFPinDir         string `mapstructure:"bpfPinDir"`
	ServiceMapSize    int    `mapstructure:"serviceMapSize"`
	BackendMapSize    int    `mapstructure:"backendMapSize"`
	SockRevNatMapSize int    `mapstructure:"sockRevNatMapSize"`
	SockConnMapSize   int    `mapstructure:"sockConnMapSize"`
	AffinityMapSize   int    `mapstructure:"affinityMapSize"`
	// AffinityMatchMapSize bounds the {frontend, backend} pairs under session affinity.
	AffinityMatchMapSize int `mapstructure:"affinityMatchMapSize"`

	// North-south: NodePort, ExternalIP and LoadBalancer traffic arriving on the devices.
	// Devices empty: the devices of the default routes.
	Devices           []string `mapstructure:"devices"`
	NodePortAddresses []string `mapstructure:"nodePortAddresses"`
	ExternalClusterIP bool     `mapstructure:"externalClusterIP"`
	// NodePortSourceRanges: lbstate.Options.NodePortSourceRanges.
	NodePortSourceRanges bool `mapstructure:"nodePortSourceRanges"`
	// LoadBalancerAlgorithm picks a backend for a new north-south flow: maglev or random.
	LoadBalancerAlgorithm string `mapstructure:"loadBalancerAlgorithm"`
	// LoadBalancerMode: how north-south flows reach backends on other nodes, lbstate.Mode.
	LoadBalancerMode string `mapstructure:"loadBalancerMode"`
	// Acceleration: the XDP program on the devices: disabled, native or best-effort.
	Acceleration     string `mapstructure:"acceleration"`
	MaglevTableSize  int    `mapstructure:"maglevTableSize"`
	MaglevHashSeed   string `mapstructure:"maglevHashSeed"`
	ConntrackMapSize int    `mapstructure:"conntrackMapSize"`
	// Masquerade of pod traffic leaving the cluster (nftables table "kpr").
	Masquerade         bool     `mapstructure:"masquerade"`
	NonMasqueradeCIDRs []string `mapstructure:"nonMasqueradeCIDRs"`

	// Sync loop, as kube-proxy's syncPeriod and minSyncPeriod.
	SyncPeriod    time.Duration `mapstructure:"syncPeriod"`
	MinSyncPeriod time.Duration `mapstructure:"minSyncPeriod"`
	// FullSyncPeriod: how often a sync recomputes every Service and checks the maps.
	FullSyncPeriod time.Duration `mapstructure:"fullSyncPeriod"`

	// RunDir holds the agent's status file for `kpr status`.
	RunDir string `mapstructure:"runDir"`
	// HealthzBindAddress is kube-proxy's health server (/healthz, /livez); empty: off.
	HealthzBindAddress string `mapstructure:"healthzBindAddress"`
	// MetricsBindAddress serves /metrics (Prometheus); empty: off.
	MetricsBindAddress string `mapstructure:"metricsBindAddress"`
	// CleanKubeProxyLeftovers: once no kube-proxy runs on the node, remove what it left.
	CleanKubeProxyLeftovers bool `mapstructure:"cleanKubeProxyLeftovers"`
}

type setting struct {
	key, flag, usage string
	def              any
}

var settings = []setting{
	{"kubeconfig", "kubeconfig", "kubeconfig to reach the API server with (default: the node's kubelet.conf)", ""},
	{"kubeletKubeconfig", "kubelet-kubeconfig", "the node's kubelet kubeconfig, written by kubeadm", "/etc/kubernetes/kubelet.conf"},
	{"kubeadmConfig", "kubeadm-config", "kubeadm config file (InitConfiguration/ClusterConfiguration/JoinConfiguration) to take the API endpoints and subnets from", ""},
	{"apiServers", "apiserver", "API server endpoints (https://host:port), in failover order; overrides the kubeadm files", []string{}},
	{"nodeName", "node-name", "this node's name in the API (default: the host name)", ""},
	{"serviceCIDRs", "service-cidr", "Service CIDRs (default: the kubeadm serviceSubnet)", []string{}},
	{"clusterCIDR", "cluster-cidr", "pod CIDRs (default: the kubeadm podSubnet)", []string{}},
	{"cgroupPath", "cgroup-path", "cgroup v2 directory the socket load balancer attaches to (default: the root of the cgroup2 mount)", ""},
	{"bpfPinDir", "bpf-pin-dir", "bpffs directory where kpr pins its maps and links", "/sys/fs/bpf/kpr"},
	{"serviceMapSize", "service-map-size", "entries in the service map (frontends plus backend slots)", 262144},
	{"backendMapSize", "backend-map-size", "entries in the backend map", 262144},
	{"sockRevNatMapSize", "sock-revnat-map-size", "entries in the socket reverse-NAT map, an LRU (replies to unconnected UDP sockets; TCP sockets whose connected-socket slot is in use)", 131072},
	{"sockConnMapSize", "sock-conn-map-size", "slots for TCP and UDP sockets connected to a Service, which keep their reverse translation (getpeername, UDP replies) there until closed; a socket whose slot is in use falls back to the reverse-NAT map (TCP) or socket storage (UDP)", 131072},
	{"affinityMapSize", "affinity-map-size", "entries in the session-affinity map", 65536},
	{"affinityMatchMapSize", "affinity-match-map-size", "entries in the map of backends each session-affinity frontend may stick to", 65536},
	{"devices", "devices", "network devices whose incoming NodePort, ExternalIP and LoadBalancer traffic kpr serves (default: the devices of the default routes)", []string{}},
	{"nodePortAddresses", "node-port-addresses", "addresses NodePorts are served on, as kube-proxy's nodePortAddresses: CIDRs, \"primary\" (each family's first address on the devices) or \"all\" (every address on the devices)", []string{"primary"}},
	{"externalClusterIP", "external-cluster-ip", "also serve ClusterIPs to traffic arriving from outside the node on the devices", false},
	{"nodePortSourceRanges", "nodeport-source-ranges", "also apply a LoadBalancer Service's loadBalancerSourceRanges to its NodePorts (kube-proxy lets NodePorts bypass them)", false},
	{"loadBalancerAlgorithm", "load-balancer-algorithm", "backend selection for north-south flows: maglev (the same backend for a flow on every node) or random", "maglev"},
	{"loadBalancerMode", "load-balancer-mode", "how north-south flows reach backends on other nodes: snat (the node translates both ways), dsr (direct server return: the backend sees the client, its node answers directly; needs kpr on every node and pod addresses routed between nodes) or hybrid (DSR for TCP, SNAT for UDP); a Service's kpr.dev/forwarding-mode annotation overrides it", "snat"},
	{"acceleration", "acceleration", "XDP on the devices, ahead of the tc programs, for flows whose backend is reached by the device they came in on: disabled, native (every device must support native XDP, else north-south traffic is not served) or best-effort (devices without native XDP keep tc only; kpr status says which)", "disabled"},
	{"maglevTableSize", "maglev-table-size", "entries of each Maglev table: a prime from 251 to 131071", maglev.DefaultTableSize},
	{"maglevHashSeed", "maglev-hash-seed", "seed of the Maglev hashes, 12 bytes in base64 (head -c 12 /dev/urandom | base64); must be the same on every node (default: a fixed seed, the same everywhere)", DefaultMaglevSeed},
	{"conntrackMapSize", "conntrack-map-size", "north-south flows tracked at once (and as many SNAT entries)", 131072},
	{"masquerade", "masquerade", "masquerade pod traffic to destinations outside nonMasqueradeCIDRs, with one nftables table per family", true},
	{"nonMasqueradeCIDRs", "non-masquerade-cidr", "destinations pod traffic keeps its source address to (default: the pod and Service CIDRs)", []string{}},
	{"syncPeriod", "sync-period", "longest interval between two syncs; a sync writes only what changed", 30 * time.Second},
	{"minSyncPeriod", "min-sync-period", "shortest interval between two syncs; changes within it are batched", time.Second},
	{"fullSyncPeriod", "full-sync-period", "how often a sync recomputes every Service and checks the BPF maps against what kpr programmed, correcting whatever differs", time.Hour},
	{"runDir", "run-dir", "directory for the agent's status file", "/run/kpr"},
	{"healthzBindAddress", "healthz-bind-address", "address and port of the health server that load balancers probe, as kube-proxy's: /healthz and /livez answer 200, or 503 when a change has waited more than 2 × syncPeriod for the datapath (/healthz also while the node is being deleted or tainted ToBeDeletedByClusterAutoscaler); empty turns it off", "0.0.0.0:10256"},
	{"cleanKubeProxyLeftovers", "clean-kube-proxy-leftovers", "once the API shows no kube-proxy pod on this node and no kube-proxy process runs in its network namespace, remove what kube-proxy left in the kernel (as kpr kubeadm clean-node does: its iptables chains but kubelet's, its nftables tables, IPVS servers and kube-ipvs0)", true},
	{"metricsBindAddress", "metrics-bind-address", "address and port of the Prometheus /metrics server, as kube-proxy's (its metric names where it has the same figure, e.g. kubeproxy_sync_proxy_rules_duration_seconds); empty turns it off", "127.0.0.1:10249"},
}

// EnvName is the environment variable of a key: KPR_ plus the key in upper snake case, a
// word starting at each upper-case letter that follows a lower-case one (serviceCIDRs ->
// KPR_SERVICE_CIDRS).
func EnvName(key string) string {
	var b strings.Builder
	b.WriteString("KPR_")
	prevLower := false
	for _, r := range key {
		upper := r >= 'A' && r <= 'Z'
		if upper && prevLower {
			b.WriteByte('_')
		}
		prevLower = r >= 'a' && r <= 'z'
		b.WriteRune(r)
	}
	return strings.ToUpper(b.String())
}

// AddFlags registers every setting's flag, plus --config.
func AddFlags(fs *pflag.FlagSet) {
	fs.String("config", DefaultFile, "configuration file (YAML); a missing default file is not an error")
	for _, s := range settings {
		switch d := s.def.(type) {
		case string:
			fs.String(s.flag, d, s.usage)
		case []string:
			fs.StringSlice(s.flag, d, s.usage)
		case int:
			fs.Int(s.flag, d, s.usage)
		case bool:
			fs.Bool(s.flag, d, s.usage)
		case time.Duration:
			fs.Duration(s.flag, d, s.usage)
		}
	}
}

// Load builds the configuration from flags, environment and file, and validates it.
func Load(fs *pflag.FlagSet) (*Config, error) {
	v := viper.New()
	for _, s := range settings {
		v.SetDefault(s.key, s.def)
		if err := v.BindEnv(s.key, EnvName(s.key)); err != nil {
			return nil, err
		}
		if f := fs.Lookup(s.flag); f != nil {
			if err := v.BindPFlag(s.key, f); err != nil {
				return nil, err
			}
		}
	}
	var keyErr error
	file := DefaultFile
	explicit := false
	if f := fs.Lookup("config"); f != nil {
		file, explicit = f.Value.String(), f.Changed
	}
	if env, ok := os.LookupEnv("KPR_CONFIG"); ok && !explicit {
		file, explicit = env, true
	}
	if file != "" {
		v.SetConfigFile(file)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			var notFound viper.ConfigFileNotFoundError
			if explicit || !(errors.As(err, &notFound) || errors.Is(err, os.ErrNotExist)) {
				return nil, fmt.Errorf("config file %s: %w", file, err)
			}
		} else {
			// Unknown keys are reported together with every other problem below.
			keyErr = checkKeys(v, file)
		}
	}
	var c Config
	err := v.Unmarshal(&c, func(dc *mapstructure.DecoderConfig) {
		dc.DecodeHook = mapstructure.ComposeDecodeHookFunc(mapstructure.StringToTimeDurationHookFunc(), mapstructure.StringToSliceHookFunc(","))
	})
	if err != nil {
		return nil, errors.Join(keyErr, fmt.Errorf("configuration: %w", err))
	}
	if err := errors.Join(keyErr, c.Validate()); err != nil {
		return nil, err
	}
	return &c, nil
}

// checkKeys rejects keys in the file that kpr does not know, naming them, so a typo is not
// silently ignored.
func checkKeys(v *viper.Viper, file string) error {
	known := map[string]bool{}
	for _, s := range settings {
		known[strings.ToLower(s.key)] = true
	}
	var errs []error
	for _, k := range v.AllKeys() {
		if !known[k] {
			errs = append(errs, fmt.Errorf("%s: unknown key %q", file, k))
		}
	}
	return errors.Join(errs...)
}

// Validate checks every field and returns all problems at once, each naming its key.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	for _, s := range c.APIServers {
		if strings.TrimSpace(s) == "" {
			bad("apiServers", "empty endpoint")
		}
	}
	for key, list := range map[string][]string{"serviceCIDRs": c.ServiceCIDRs, "clusterCIDR": c.ClusterCIDR} {
		for _, s := range list {
			if _, err := netip.ParsePrefix(strings.TrimSpace(s)); err != nil {
				bad(key, "%q is not a CIDR", s)
			}
		}
	}
	if c.BPFPinDir == "" || !filepath.IsAbs(c.BPFPinDir) {
		bad("bpfPinDir", "%q must be an absolute path", c.BPFPinDir)
	}
	if c.CgroupPath != "" && !filepath.IsAbs(c.CgroupPath) {
		bad("cgroupPath", "%q must be an absolute path", c.CgroupPath)
	}
	for _, a := range []struct{ key, value, example string }{
		{"healthzBindAddress", c.HealthzBindAddress, "0.0.0.0:10256"},
		{"metricsBindAddress", c.MetricsBindAddress, "127.0.0.1:10249"},
	} {
		if a.value == "" {
			continue
		}
		host, port, err := net.SplitHostPort(a.value)
		if err != nil {
			bad(a.key, "%q: want IP:port, e.g. %s (empty turns the server off): %v", a.value, a.example, err)
		} else if _, perr := netip.ParseAddr(host); (host != "" && perr != nil) || !validPort(port) {
			bad(a.key, "%q: want an IP address and a port from 1 to 65535", a.value)
		}
	}
	if c.RunDir == "" || !filepath.IsAbs(c.RunDir) {
		bad("runDir", "%q must be an absolute path", c.RunDir)
	}
	for key, n := range map[string]int{"serviceMapSize": c.ServiceMapSize, "backendMapSize": c.BackendMapSize, "sockRevNatMapSize": c.SockRevNatMapSize, "sockConnMapSize": c.SockConnMapSize, "affinityMapSize": c.AffinityMapSize, "affinityMatchMapSize": c.AffinityMatchMapSize} {
		if n < 1 || n > 1<<24 {
			bad(key, "%d is out of range 1..16777216", n)
		}
	}
	for _, a := range c.NodePortAddresses {
		a = strings.TrimSpace(a)
		if a == "primary" || a == "all" {
			if len(c.NodePortAddresses) > 1 {
				bad("nodePortAddresses", "%q cannot be combined with other entries", a)
			}
			continue
		}
		if _, err := netip.ParsePrefix(a); err != nil {
			bad("nodePortAddresses", "%q is neither a CIDR nor \"primary\" or \"all\"", a)
		}
	}
	for _, d := range c.Devices {
		if strings.TrimSpace(d) == "" || strings.ContainsAny(d, "/ ") || len(d) > 15 {
			bad("devices", "%q is not a network device name", d)
		}
	}
	switch c.LoadBalancerAlgorithm {
	case "maglev", "random":
	default:
		bad("loadBalancerAlgorithm", "%q is not maglev or random", c.LoadBalancerAlgorithm)
	}
	switch c.Acceleration {
	case "disabled", "native", "best-effort":
	default:
		bad("acceleration", "%q is not disabled, native or best-effort", c.Acceleration)
	}
	if _, ok := lbstate.ParseMode(c.LoadBalancerMode); !ok {
		bad("loadBalancerMode", "%q is not snat, dsr or hybrid", c.LoadBalancerMode)
	}
	if err := maglev.ValidTableSize(c.MaglevTableSize); err != nil {
		errs = append(errs, err) // names maglevTableSize
	}
	if _, err := maglev.ParseSeed(c.MaglevHashSeed); err != nil {
		errs = append(errs, err) // names maglevHashSeed
	}
	if c.ConntrackMapSize < 1024 || c.ConntrackMapSize > 1<<24 {
		bad("conntrackMapSize", "%d is out of range 1024..16777216", c.ConntrackMapSize)
	}
	for _, s := range c.NonMasqueradeCIDRs {
		if _, err := netip.ParsePrefix(strings.TrimSpace(s)); err != nil {
			bad("nonMasqueradeCIDRs", "%q is not a CIDR", s)
		}
	}
	if c.MinSyncPeriod < 0 {
		bad("minSyncPeriod", "%s is negative", c.MinSyncPeriod)
	}
	if c.FullSyncPeriod <= 0 {
		bad("fullSyncPeriod", "%s must be positive", c.FullSyncPeriod)
	}
	if c.SyncPeriod <= 0 {
		bad("syncPeriod", "%s must be positive", c.SyncPeriod)
	} else if c.SyncPeriod < c.MinSyncPeriod {
		bad("syncPeriod", "%s is shorter than minSyncPeriod %s", c.SyncPeriod, c.MinSyncPeriod)
	}
	// Map iteration above is random; give the user a stable order.
	slices.SortFunc(errs, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
	return errors.Join(errs...)
}

// DefaultFileText is the configuration file that packages install: every key, what it does
// and its default, all commented out, so the file changes nothing until a line is enabled.
func DefaultFileText() string {
	var b strings.Builder
	b.WriteString("# kpr's configuration (" + DefaultFile + "). Every key is listed with what it does and\n" +
		"# its default, commented out; enable a line to change it. A command-line flag or a KPR_*\n" +
		"# environment variable (e.g. in /etc/default/kpr) wins over this file.\n" +
		"# `kpr config validate` checks the file; kpr refuses to start with an invalid one and names\n" +
		"# the key.\n")
	for _, s := range settings {
		b.WriteString("\n")
		for _, line := range wrap(s.usage+" (flag --"+s.flag+", environment "+EnvName(s.key)+")", 88) {
			b.WriteString("# " + line + "\n")
		}
		fmt.Fprintf(&b, "# %s: %s\n", s.key, yamlValue(s.def))
	}
	return b.String()
}

// yamlValue writes a default as YAML that Load reads back to the same value.
func yamlValue(v any) string {
	switch d := v.(type) {
	case string:
		return fmt.Sprintf("%q", d)
	case []string:
		q := make([]string, len(d))
		for i, s := range d {
			q[i] = fmt.Sprintf("%q", s)
		}
		return "[" + strings.Join(q, ", ") + "]"
	case time.Duration:
		return d.String()
	}
	return fmt.Sprint(v)
}

// wrap splits text into lines of at most width characters at spaces.
func wrap(text string, width int) []string {
	var lines []string
	line := ""
	for _, w := range strings.Fields(text) {
		if line != "" && len(line)+1+len(w) > width {
			lines = append(lines, line)
			line = ""
		}
		if line != "" {
			line += " "
		}
		line += w
	}
	return append(lines, line)
}

func validPort(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n >= 1 && n <= 65535
}

// Keys lists the configuration keys, for documentation and tests.
func Keys() []string {
	out := make([]string, 0, len(settings))
	for _, s := range settings {
		out = append(out, s.key)
	}
	return out
}
