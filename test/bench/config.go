package bench

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Scenario is what the benchmark measures: a pod reaching a ClusterIP, or a host outside the
// cluster reaching a NodePort.
type Scenario string

const (
	ClusterIP Scenario = "clusterip"
	NodePort  Scenario = "nodeport"
)

// ParseScenario accepts clusterip and nodeport.
func ParseScenario(s string) (Scenario, error) {
	switch Scenario(strings.TrimSpace(strings.ToLower(s))) {
	case ClusterIP, "":
		return ClusterIP, nil
	case NodePort:
		return NodePort, nil
	}
	return "", fmt.Errorf("unknown scenario %q (want clusterip or nodeport)", s)
}

// Path is one way from the client to the Service's pods.
type Path string

const (
	Direct Path = "direct"
	Kpr    Path = "kpr"
	KprTC  Path = "kpr tc"  // NodePort: kpr's tc programs
	KprXDP Path = "kpr XDP" // NodePort: kpr with acceleration native
	// DirectControl is the own side of a control pair: a second direct client.
	DirectControl           Path = "direct (control)"
	KubeProxyNFTables       Path = "kube-proxy nftables"
	KubeProxyIPTables       Path = "kube-proxy iptables"
	measuredNamespace            = "bench"
	measuredService              = "web"
	fillNamespace                = "bench-fill"
	servicePort                  = 80
	backendPort                  = 8080
	backendPods                  = 10
	firstBackendSlot             = 2
	clientSlot                   = 100
	maxServices                  = 20000
	maxRounds                    = 20
	maxEndpointsPerService       = 100
	maxCreateParallelism         = 64
	defaultFirstAnswerLimit      = 3 * time.Minute
)

// AllPaths in report order: of the ClusterIP scenario, and of the NodePort scenario.
var (
	AllPaths         = []Path{Direct, Kpr, KubeProxyNFTables, KubeProxyIPTables}
	AllNodePortPaths = []Path{Direct, KprTC, KprXDP, KubeProxyNFTables, KubeProxyIPTables}
)

// ParsePath accepts the names above and the short forms nftables, iptables, tc and xdp.
func ParsePath(s string) (Path, error) {
	switch strings.TrimSpace(strings.ToLower(s)) {
	case "direct":
		return Direct, nil
	case "kpr":
		return Kpr, nil
	case "tc", "kpr-tc", string(KprTC):
		return KprTC, nil
	case "xdp", "kpr-xdp", "kpr xdp":
		return KprXDP, nil
	case "nftables", "kube-proxy-nftables", string(KubeProxyNFTables):
		return KubeProxyNFTables, nil
	case "iptables", "kube-proxy-iptables", string(KubeProxyIPTables):
		return KubeProxyIPTables, nil
	}
	return "", fmt.Errorf("unknown path %q (want direct, kpr, tc, xdp, nftables or iptables)", s)
}

// isKpr: the path runs kpr.
func (p Path) isKpr() bool { return p == Kpr || p == KprTC || p == KprXDP }

// Config is one benchmark run.
type Config struct {
	// Scenario: ClusterIP (the default) or NodePort.
	Scenario Scenario
	// Scales are the Service counts to measure at, ascending (the measured Service included).
	Scales []int
	// Paths to measure; every round runs each of them once.
	Paths  []Path
	Rounds int
	// EndpointsPerService of the filler Services (the measured one has the backend pods).
	EndpointsPerService int
	// CreateParallelism bounds concurrent API requests while creating Services.
	CreateParallelism int

	// Rate: Workers concurrent clients, each a new connection per request.
	Workers      int
	RateWarmup   time.Duration
	RateDuration time.Duration
	// Latency, one request at a time on fresh and on established connections.
	LatencyWarmup   time.Duration
	LatencyDuration time.Duration
	// Pairs of kpr and direct samples in each kpr run, for the comparison with the direct
	// path; each pair's two clients take turns in slices of Slice.
	Pairs int
	Slice time.Duration
	// ControlPairs are pairs measured the same way in each kpr run of the ClusterIP scenario,
	// but with a direct client on both sides: an unbiased method gives them 100%.
	ControlPairs int
	// Pin puts the clients on CPU 0 and the servers on the other CPUs.
	Pin bool
	// OthersLimit is the share of the machine's CPU that processes outside the sandbox may use
	// during a measurement before it is taken again, at most Retakes times. QuietWait bounds
	// the wait for a quiet second before a retake; DisturbanceBudget bounds the time all
	// retakes and waits of the run may add.
	OthersLimit       float64
	Retakes           int
	QuietWait         time.Duration
	DisturbanceBudget time.Duration
	// RequestTimeout bounds one request (connect, request, answer).
	RequestTimeout time.Duration

	// KprFirstAnswerLimit and KubeProxyFirstAnswerLimit bound the wait for the first answer
	// after starting the proxy; a path that does not answer in time is reported as such and
	// skipped for the remaining rounds of that scale.
	KprFirstAnswerLimit       time.Duration
	KubeProxyFirstAnswerLimit time.Duration

	// KprRev, when set, is the git revision kpr is built from instead of the working tree.
	KprRev string

	// K8sBinDir holds kube-apiserver and kube-proxy (default: as the sandbox finds it).
	K8sBinDir string
	// WorkDir receives the sandbox, binaries and logs. Required.
	WorkDir string
	// Prefix of the sandbox namespaces; default kpr-bench-<random>.
	Prefix string
	// Log receives progress lines.
	Log func(format string, args ...any)
}

// DefaultConfig is what `make bench` runs.
func DefaultConfig() Config {
	return Config{
		Scenario:                  ClusterIP,
		Scales:                    []int{1, 10000},
		Paths:                     slices.Clone(AllPaths),
		Rounds:                    3,
		EndpointsPerService:       10,
		CreateParallelism:         8,
		Workers:                   8,
		RateWarmup:                500 * time.Millisecond,
		RateDuration:              3 * time.Second,
		LatencyWarmup:             300 * time.Millisecond,
		LatencyDuration:           2 * time.Second,
		Pairs:                     5,
		ControlPairs:              2,
		Slice:                     250 * time.Millisecond,
		Pin:                       true,
		OthersLimit:               0.05,
		Retakes:                   2,
		QuietWait:                 20 * time.Second,
		DisturbanceBudget:         3 * time.Minute,
		RequestTimeout:            3 * time.Second,
		KprFirstAnswerLimit:       time.Minute,
		KubeProxyFirstAnswerLimit: defaultFirstAnswerLimit,
	}
}

// DefaultNodePortConfig is what `make bench-nodeport` runs: the ClusterIP defaults with the
// NodePort paths and one Service.
func DefaultNodePortConfig() Config {
	c := DefaultConfig()
	c.Scenario = NodePort
	c.Scales = []int{1}
	c.Paths = slices.Clone(AllNodePortPaths)
	return c
}

// Quick shortens c to a development subset: 1 Service, one round, short windows.
func Quick(c Config) Config {
	c.Scales = []int{1}
	c.Rounds = 1
	c.Pairs = 2
	c.ControlPairs = 0
	c.RateWarmup = 500 * time.Millisecond
	c.RateDuration = 2 * time.Second
	c.LatencyWarmup = 300 * time.Millisecond
	c.LatencyDuration = 1500 * time.Millisecond
	return c
}

// QuickConfig is a short subset for development: 1 Service, one round, short windows.
func QuickConfig() Config { return Quick(DefaultConfig()) }

// Validate checks bounds, so a typo cannot start an endless run.
func (c *Config) Validate() error {
	var errs []error
	if len(c.Scales) == 0 {
		errs = append(errs, errors.New("scales: none"))
	}
	for i, s := range c.Scales {
		if s < 1 || s > maxServices {
			errs = append(errs, fmt.Errorf("scales: %d out of range 1..%d", s, maxServices))
		}
		if i > 0 && s <= c.Scales[i-1] {
			errs = append(errs, fmt.Errorf("scales: want ascending, got %v", c.Scales))
		}
	}
	if len(c.Paths) == 0 {
		errs = append(errs, errors.New("paths: none"))
	}
	valid := AllPaths
	switch c.Scenario {
	case ClusterIP:
	case NodePort:
		valid = AllNodePortPaths
		if len(c.Scales) != 1 || c.Scales[0] != 1 {
			errs = append(errs, fmt.Errorf("scales: the NodePort scenario measures 1 Service, got %v", c.Scales))
		}
	default:
		errs = append(errs, fmt.Errorf("scenario: unknown %q", c.Scenario))
	}
	for _, p := range c.Paths {
		if !slices.Contains(valid, p) {
			errs = append(errs, fmt.Errorf("paths: %q is not a path of the %s scenario (%v)", p, c.Scenario, valid))
		}
	}
	if c.Rounds < 1 || c.Rounds > maxRounds {
		errs = append(errs, fmt.Errorf("rounds: %d out of range 1..%d", c.Rounds, maxRounds))
	}
	if c.EndpointsPerService < 1 || c.EndpointsPerService > maxEndpointsPerService {
		errs = append(errs, fmt.Errorf("endpoints per service: %d out of range 1..%d", c.EndpointsPerService, maxEndpointsPerService))
	}
	if c.CreateParallelism < 1 || c.CreateParallelism > maxCreateParallelism {
		errs = append(errs, fmt.Errorf("create parallelism: %d out of range 1..%d", c.CreateParallelism, maxCreateParallelism))
	}
	if c.Pairs < 1 || c.Pairs > 10 {
		errs = append(errs, fmt.Errorf("pairs: %d out of range 1..10", c.Pairs))
	}
	if c.ControlPairs < 0 || c.ControlPairs > 10 {
		errs = append(errs, fmt.Errorf("control-pairs: %d out of range 0..10", c.ControlPairs))
	}
	if c.OthersLimit <= 0 || c.OthersLimit > 1 {
		errs = append(errs, fmt.Errorf("others limit: %v out of range (0, 1]", c.OthersLimit))
	}
	if c.Retakes < 0 || c.Retakes > 5 {
		errs = append(errs, fmt.Errorf("retakes: %d out of range 0..5", c.Retakes))
	}
	if c.Workers < 1 || c.Workers > 256 {
		errs = append(errs, fmt.Errorf("workers: %d out of range 1..256", c.Workers))
	}
	for _, d := range []struct {
		name      string
		v, lo, hi time.Duration
	}{
		{"rate warm-up", c.RateWarmup, 0, time.Minute},
		{"rate duration", c.RateDuration, time.Second, 5 * time.Minute},
		{"latency warm-up", c.LatencyWarmup, 0, time.Minute},
		{"latency duration", c.LatencyDuration, time.Second, 5 * time.Minute},
		{"slice", c.Slice, 20 * time.Millisecond, 10 * time.Second},
		{"request timeout", c.RequestTimeout, 100 * time.Millisecond, time.Minute},
		{"quiet wait", c.QuietWait, 0, 5 * time.Minute},
		{"disturbance budget", c.DisturbanceBudget, 0, 30 * time.Minute},
		{"kpr first-answer limit", c.KprFirstAnswerLimit, time.Second, 10 * time.Minute},
		{"kube-proxy first-answer limit", c.KubeProxyFirstAnswerLimit, time.Second, 30 * time.Minute},
	} {
		if d.v < d.lo || d.v > d.hi {
			errs = append(errs, fmt.Errorf("%s: %v out of range %v..%v", d.name, d.v, d.lo, d.hi))
		}
	}
	if c.WorkDir == "" {
		errs = append(errs, errors.New("work dir: required"))
	}
	return errors.Join(errs...)
}

// firstAnswerLimit is how long path p may take to answer after it starts.
func (c *Config) firstAnswerLimit(p Path) time.Duration {
	if p.isKpr() {
		return c.KprFirstAnswerLimit
	}
	return c.KubeProxyFirstAnswerLimit
}
