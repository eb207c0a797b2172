// Package agent is kpr's node agent: it finds the API server, loads the datapath, watches
// Services, EndpointSlices and its Node, and keeps the load-balancer maps equal to what
// kube-proxy would compute, applying only differences.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"golang.org/x/sys/unix"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/kubeadm"
	"github.com/kpr-dev/kpr/node/config"
	"github.com/kpr-dev/kpr/node/datapath"
	"github.com/kpr-dev/kpr/node/healthcheck"
	"github.com/kpr-dev/kpr/node/lbstate"
	"github.com/kpr-dev/kpr/node/maglev"
	"github.com/kpr-dev/kpr/node/metrics"
	"github.com/kpr-dev/kpr/systemd"
)

// Version, Commit and BuildDate are stamped by the build (make build, make package).
var (
	Version   = "dev"
	Commit    = "unknown"
	BuildDate = "unknown"
)

// Agent is one running kpr on one node.
type Agent struct {
	cfg    *config.Config
	log    *slog.Logger
	notify systemd.Notifier

	node    lbstate.Node
	cluster *kubeadm.Cluster
	dp      *bpf.Datapath
	rec     *datapath.Reconciler
	client  kubernetes.Interface

	services cache.SharedIndexInformer
	slices   cache.SharedIndexInformer
	nodes    cache.SharedIndexInformer

	tracker tracker
	status  *statusWriter

	// ns is the north-south setup; nil when that traffic is not served. Guarded by mu: the
	// address watcher replaces it.
	ns         *northSouth
	maglevSeed maglev.Seed
	// problems are the last reported problems per Service, so each is logged once.
	problems map[string]string

	// hc serves the healthCheckNodePorts (with the north-south datapath only); health is what
	// it should serve, kept by frontends(), and healthErr the last problem reported.
	hc            *healthcheck.Server
	proxyHealth   *healthcheck.ProxyHealth // kube-proxy's /healthz and /livez; nil when off
	metrics       *metrics.Metrics         // always recorded; served when metricsBindAddress is set
	health        map[string]healthcheck.Service
	healthChanged bool
	healthErr     string

	// cachesSynced is closed once the event handlers have seen the informers' initial lists
	// (set by startInformers).
	cachesSynced chan struct{}

	mu           sync.Mutex
	lastLoop     time.Time
	lastFull     time.Time
	forceFull    bool
	runner       *runner
	syncFailures int
	apiDown      bool
	// kubeProxySeen is the guard's last finding ("": no kube-proxy on this node).
	kubeProxySeen string
	// leftoversCleaned: kube-proxy's leftovers were looked for in this run.
	leftoversCleaned bool
}

// New prepares an agent; Run starts it.
func New(cfg *config.Config, log *slog.Logger) *Agent {
	return &Agent{cfg: cfg, log: log, metrics: metrics.New(), notify: systemd.Notifier{Log: func(f string, a ...any) { log.Warn(fmt.Sprintf(f, a...)) }}}
}

// Run loads the datapath, tells systemd it is ready, and keeps the datapath in sync until ctx
// is cancelled. Returning leaves the datapath programmed and pinned.
func (a *Agent) Run(ctx context.Context) error {
	a.status = &statusWriter{dir: a.cfg.RunDir}
	a.status.set(func(s *Status) {
		s.Version, s.PID, s.Started = Version, os.Getpid(), time.Now()
	})
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := a.setup(ctx); err != nil {
		a.status.set(func(s *Status) { s.Error = err.Error() })
		return err
	}
	defer a.dp.Close()
	defer a.closeNorthSouth()
	if a.ns != nil {
		a.hc = healthcheck.New(a.ns.nodePort, a.Healthy, a.log)
		a.health = map[string]healthcheck.Service{}
		defer a.hc.Close()
	}

	// READY once the datapath is loaded, attached and restored from the pins: on a
	// control-plane node the API server itself may wait for kubelet, which waits for us.
	a.notify.Ready()
	a.notify.Status("datapath loaded; waiting for the API server")
	a.log.Info("datapath ready", "pinDir", a.cfg.BPFPinDir, "cgroup", a.status.get().Cgroup, "restoredFrontends", a.status.get().Frontends)

	if addr := a.cfg.MetricsBindAddress; addr != "" {
		if stop, err := healthcheck.Serve(addr, a.metrics.Handler()); err != nil {
			a.log.Error("metrics server not started", "address", addr, "err", err)
		} else {
			defer stop()
		}
	}
	if a.cfg.HealthzBindAddress != "" {
		ph := healthcheck.NewProxyHealth(2*a.cfg.SyncPeriod, a.nodeObject)
		ph.Answered = func(path string, code int) {
			c := a.metrics.Healthz
			if path == "/livez" {
				c = a.metrics.Livez
			}
			c.WithLabelValues(strconv.Itoa(code)).Inc()
		}
		if stop, err := healthcheck.Serve(a.cfg.HealthzBindAddress, ph.Handler()); err != nil {
			// As kube-proxy: the datapath matters more than its health server.
			a.log.Error("health server not started; load balancers probing it will see this node as down",
				"address", a.cfg.HealthzBindAddress, "err", err)
		} else {
			a.proxyHealth = ph
			defer stop()
		}
	}
	r := newRunner(a.syncOnce, a.cfg.MinSyncPeriod, a.cfg.SyncPeriod)
	a.tracker.mu.Lock()
	a.tracker.onChange = func() {
		a.metrics.LastQueued.SetToCurrentTime()
		if a.proxyHealth != nil {
			a.proxyHealth.QueuedUpdate()
		}
		r.Run()
	}
	a.tracker.mu.Unlock()
	a.mu.Lock()
	a.runner = r
	a.mu.Unlock()
	var wg sync.WaitGroup
	wg.Go(func() { r.Loop(ctx) })
	wg.Go(func() {
		select {
		case <-a.cachesSynced:
			r.Run()
		case <-ctx.Done():
		}
	})
	wg.Go(func() { a.notify.Watchdog(ctx, a.Healthy) })
	if a.ns != nil {
		wg.Go(func() { a.followAddresses(ctx) })
	}
	r.Run()
	<-ctx.Done()
	a.notify.Stopping()
	a.log.Info("stopping; the datapath stays in place")
	cancel()
	wg.Wait()
	a.status.set(func(s *Status) { s.Stopped = time.Now() })
	return nil
}

func (a *Agent) setup(ctx context.Context) error {
	cluster, err := kubeadm.Discover(kubeadm.Options{
		KubeadmConfig: a.cfg.KubeadmConfig,
		KubeletConf:   a.cfg.KubeletKubeconfig,
		Kubeconfig:    a.cfg.Kubeconfig,
		APIServers:    a.cfg.APIServers,
	})
	if err != nil {
		return fmt.Errorf("finding the API server: %w", err)
	}
	if cluster.RESTConfig == nil {
		return fmt.Errorf("finding the API server: no credentials (set kubeconfig, or kubeletKubeconfig to the node's kubelet.conf); tried: %s", strings.Join(cluster.Sources, "; "))
	}
	a.cluster = cluster
	for _, s := range cluster.Sources {
		a.log.Info("api discovery", "source", s)
	}
	name := a.cfg.NodeName
	if name == "" {
		if name, err = os.Hostname(); err != nil {
			return fmt.Errorf("nodeName: not set and the host name is unknown: %w", err)
		}
	}
	a.node.Name = strings.ToLower(name)

	// The informers' initial lists (10,000 Services take about a second to arrive and decode)
	// run while the datapath loads; the first sync waits for both.
	cfg := rest.CopyConfig(cluster.RESTConfig)
	cfg.Dial = a.observeDial(cfg.Dial)
	// Protobuf, as kube-proxy uses: lists of 10,000 Services decode several times faster.
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("API client: %w", err)
	}
	a.client = client
	a.startInformers(ctx)

	if err := bpf.Probe(); err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	cgroup := a.cfg.CgroupPath
	if cgroup == "" {
		if cgroup, err = bpf.CgroupV2Mount(); err != nil {
			return fmt.Errorf("cgroupPath: not set and no cgroup2 mount found: %w", err)
		}
	}
	if err := ensureBPFFS(a.cfg.BPFPinDir); err != nil {
		return fmt.Errorf("bpfPinDir: %w", err)
	}
	dp, err := bpf.Load(bpf.Config{
		PinDir:               a.cfg.BPFPinDir,
		CgroupPath:           cgroup,
		ServiceMapSize:       a.cfg.ServiceMapSize,
		BackendMapSize:       a.cfg.BackendMapSize,
		SockRevNatMapSize:    a.cfg.SockRevNatMapSize,
		SockConnMapSize:      a.cfg.SockConnMapSize,
		AffinityMapSize:      a.cfg.AffinityMapSize,
		AffinityMatchMapSize: a.cfg.AffinityMatchMapSize,
	})
	if err != nil {
		return fmt.Errorf("loading the datapath: %+v", err)
	}
	a.dp = dp
	nw, err := effectiveNetworking(a.cfg, cluster)
	if err != nil {
		dp.Close()
		return err
	}
	// Safe before the first sync, even with the API server down: only addresses that no
	// frontend owns are refused, and the frontends are already restored from the pins. On a
	// fresh node every ClusterIP is refused until that sync, where untranslated it would fail
	// anyway.
	if err := dp.Maps.SetServiceCIDRs(nw.serviceCIDRs); err != nil {
		dp.Close()
		return fmt.Errorf("programming the Service CIDRs %v (%s): %w", nw.serviceCIDRs, nw.serviceCIDRsFrom, err)
	}
	if len(nw.serviceCIDRs) == 0 {
		a.log.Warn("no Service CIDRs known: connections to unallocated ClusterIPs are not refused and follow the node's routes; "+
			"set serviceCIDRs (--service-cidr, KPR_SERVICE_CIDRS) or kubeadmConfig to a file with networking.serviceSubnet",
			"why", nw.serviceCIDRsFrom)
	}
	a.log.Info("cluster networking", "serviceCIDRs", nw.serviceCIDRs, "serviceCIDRsFrom", nw.serviceCIDRsFrom,
		"podCIDRs", nw.podCIDRs, "podCIDRsFrom", nw.podCIDRsFrom, "dnsDomain", nw.dnsDomain, "dnsDomainFrom", nw.dnsDomainFrom)
	rec, err := datapath.NewReconciler(dp.Maps)
	if err != nil {
		dp.Close()
		return fmt.Errorf("restoring from %s: %w", a.cfg.BPFPinDir, err)
	}
	a.rec = rec
	if a.maglevSeed, err = maglev.ParseSeed(a.cfg.MaglevHashSeed); err != nil {
		dp.Close()
		return err
	}
	nsStatus := "not served"
	if ns, err := discoverNorthSouth(a.cfg); err != nil {
		a.log.Warn("NodePort, ExternalIP and LoadBalancer traffic from outside the node is not served", "err", err)
	} else if err := loadNorthSouth(a.cfg, ns, a.maglevSeed); err != nil {
		a.log.Warn("north-south datapath not loaded", "err", err)
	} else {
		a.ns = ns
		nsStatus = ns.status()
		rec.UseSourceRanges(ns.np.Maps)
		if a.cfg.LoadBalancerAlgorithm == "maglev" {
			rec.UseMaglev(ns.np.Maps, a.maglevSeed)
		} else if err := dropMaglevTables(ns.np.Maps); err != nil {
			a.log.Warn("removing Maglev tables (loadBalancerAlgorithm: random)", "err", err)
		}
		a.log.Info("north-south datapath ready", "devices", ns.devices, "nodePortAddresses", ns.nodePort, "snat4", ns.snat4, "snat6", ns.snat6, "algorithm", a.cfg.LoadBalancerAlgorithm, "mode", a.cfg.LoadBalancerMode)
	}
	// Also without the north-south datapath: a guard left in the pins by an earlier run goes.
	var nodePort []netip.Addr
	if a.ns != nil {
		nodePort = a.ns.nodePort
	}
	a.guardBinds(nodePort)
	masqStatus, err := applyMasquerade(a.cfg, nw)
	if err != nil {
		a.closeNorthSouth()
		dp.Close()
		return err
	}
	a.log.Info("masquerade", "state", masqStatus)
	a.status.set(func(s *Status) {
		s.Node = a.node.Name
		s.APIServers = cluster.Endpoints
		s.PinDir = a.cfg.BPFPinDir
		s.Cgroup = cgroup
		s.Frontends = rec.Programmed()
		s.Networking = nw.status()
		s.NorthSouth = nsStatus
		s.Masquerade = masqStatus
		s.API = "connecting"
	})
	return nil
}

// proxySelector is kube-proxy's: objects that name another proxy, and headless Services'
// slices, are not ours.
func proxySelector() string {
	noProxyName, _ := labels.NewRequirement(lbstate.LabelServiceProxyName, selection.DoesNotExist, nil)
	noHeadless, _ := labels.NewRequirement(lbstate.LabelHeadless, selection.DoesNotExist, nil)
	return labels.NewSelector().Add(*noProxyName, *noHeadless).String()
}

const byService = "byService"

// trimObject drops from cached objects what kpr never reads, before they enter the informer
// caches: managedFields and owner references everywhere, and in EndpointSlices each
// endpoint's targetRef, hostname, zone, deprecatedTopology and every address after the first
// (kube-proxy uses only the first). At 10,000 Services this halves the caches.
func trimObject(obj any) (any, error) {
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
		m.SetOwnerReferences(nil)
	}
	if s, ok := obj.(*discovery.EndpointSlice); ok {
		for i := range s.Endpoints {
			ep := &s.Endpoints[i]
			ep.TargetRef = nil
			ep.Hostname = nil
			ep.Zone = nil
			ep.DeprecatedTopology = nil
			if len(ep.Addresses) > 1 {
				ep.Addresses = ep.Addresses[:1:1]
			}
		}
	}
	return obj, nil
}

func (a *Agent) startInformers(ctx context.Context) {
	f := informers.NewSharedInformerFactoryWithOptions(a.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = proxySelector() }),
		informers.WithTransform(trimObject))
	a.services = f.Core().V1().Services().Informer()
	a.slices = f.Discovery().V1().EndpointSlices().Informer()
	_ = a.slices.AddIndexers(cache.Indexers{byService: func(obj any) ([]string, error) {
		s, ok := obj.(*discovery.EndpointSlice)
		if !ok || s.Labels[discovery.LabelServiceName] == "" {
			return nil, nil
		}
		return []string{s.Namespace + "/" + s.Labels[discovery.LabelServiceName]}, nil
	}})
	nf := informers.NewSharedInformerFactoryWithOptions(a.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", a.node.Name).String()
		}))
	a.nodes = nf.Core().V1().Nodes().Informer()

	serviceName := func(obj any) string {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		m, err := meta.Accessor(obj)
		if err != nil {
			return ""
		}
		if s, ok := obj.(*discovery.EndpointSlice); ok {
			if s.Labels[discovery.LabelServiceName] == "" {
				return ""
			}
			return s.Namespace + "/" + s.Labels[discovery.LabelServiceName]
		}
		return m.GetNamespace() + "/" + m.GetName()
	}
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.tracker.touch(serviceName(obj)) },
		UpdateFunc: func(_, obj any) { a.tracker.touch(serviceName(obj)) },
		DeleteFunc: func(obj any) { a.tracker.touch(serviceName(obj)) },
	}
	// The registrations, not the informers, say when the handler has been told about every
	// object of the initial lists: a sync before that would be followed by a second one
	// recomputing every Service again for the late notifications.
	svcReg, _ := a.services.AddEventHandler(h)
	sliceReg, _ := a.slices.AddEventHandler(h)
	a.cachesSynced = make(chan struct{})
	if svcReg != nil && sliceReg != nil {
		start := time.Now()
		go func() {
			for _, c := range []cache.DoneChecker{svcReg.HasSyncedChecker(), sliceReg.HasSyncedChecker()} {
				select {
				case <-c.Done():
				case <-ctx.Done():
					return
				}
			}
			a.log.Info("API caches synced", "services", len(a.services.GetStore().ListKeys()),
				"endpointSlices", len(a.slices.GetStore().ListKeys()), "took", time.Since(start))
			close(a.cachesSynced)
		}()
	}
	nodeChanged := func(obj any) {
		if n, ok := obj.(*v1.Node); ok {
			a.mu.Lock()
			zone := n.Labels[v1.LabelTopologyZone]
			changed := zone != a.node.Zone
			a.node.Zone = zone
			a.mu.Unlock()
			if changed {
				a.tracker.touchAll()
			}
		}
	}
	_, _ = a.nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    nodeChanged,
		UpdateFunc: func(_, obj any) { nodeChanged(obj) },
	})
	f.Start(ctx.Done())
	nf.Start(ctx.Done())
	a.startKubeProxyGuard(ctx)
}

// observeDial wraps the API client's dialer to follow whether the API server can be reached.
// client-go's reflectors retry a refused connection quietly, with backoff, and keep the
// caches; this is where kpr learns about the outage, logs it once per state change, and keeps
// the datapath as programmed. It costs no request of its own.
func (a *Agent) observeDial(dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if dial == nil {
		d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
		dial = d.DialContext
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil && ctx.Err() == nil {
			a.setAPIDown(true, err)
		} else if err == nil {
			a.setAPIDown(false, nil)
		}
		return c, err
	}
}

func (a *Agent) setAPIDown(down bool, err error) {
	a.mu.Lock()
	changed := a.apiDown != down
	a.apiDown = down
	a.mu.Unlock()
	if !changed {
		return
	}
	if down {
		a.log.Warn("API server unreachable; keeping the programmed datapath and retrying", "err", err)
		a.notify.Status("API server unreachable; datapath kept as programmed")
		a.status.set(func(s *Status) { s.API = "unreachable since " + time.Now().Format(time.RFC3339) + ": " + err.Error() })
		return
	}
	a.log.Info("API server reachable again")
	a.status.set(func(s *Status) { s.API = "connected" })
	// Informers resume from where they were; a full pass makes sure nothing is missed.
	a.tracker.touchAll()
}

// synced reports whether the informers' initial lists have reached the event handlers.
func (a *Agent) synced() bool {
	select {
	case <-a.cachesSynced:
		return true
	default:
		return false
	}
}

// errNotSynced: the informers' initial lists are not all in; the runner is run again when
// they are (cachesSynced).
var errNotSynced = fmt.Errorf("informer caches not synced yet: %w", errNotReady)

// RequestFullSync makes the next sync, started at once, a full one: every Service recomputed
// and the BPF maps checked against what kpr programmed (`kill -HUP`, `systemctl reload kpr`).
func (a *Agent) RequestFullSync() {
	a.mu.Lock()
	a.forceFull = true
	r := a.runner
	a.mu.Unlock()
	if r != nil {
		r.Run()
	}
}

// syncOnce computes the desired state of the Services that changed and programs the
// difference. It is the runner's only function, so it never runs concurrently.
func (a *Agent) syncOnce() error {
	a.mu.Lock()
	a.lastLoop = time.Now()
	a.mu.Unlock()
	if !a.synced() {
		// Not an error to report: the runner tries again soon, with backoff.
		return errNotSynced
	}
	a.mu.Lock()
	// A full pass recomputes every Service and checks the maps against the mirror, to correct
	// drift, by default once an hour as kube-proxy's nftables proxier does. In between, syncs
	// touch only the Services that changed: at 10,000 Services a full pass costs most of a
	// second of CPU, which every syncPeriod (30 s) was 3% of a core for nothing (make bench).
	full := a.forceFull || time.Since(a.lastFull) >= a.cfg.FullSyncPeriod
	a.forceFull = false
	node := a.node
	a.mu.Unlock()
	start := time.Now()
	touched, all := a.tracker.take()
	if full || all {
		touched = nil
		names := map[string]bool{}
		for _, n := range a.rec.Services() {
			names[n] = true
		}
		for _, k := range a.services.GetIndexer().ListKeys() {
			names[k] = true
		}
		for n := range names {
			a.rec.Set(n, a.frontends(n, node))
		}
	} else {
		for _, n := range touched {
			a.rec.Set(n, a.frontends(n, node))
		}
	}
	st, err := a.rec.Sync(touched) // nil: a full sync
	a.syncHealthChecks()
	elapsed := time.Since(start)
	a.mu.Lock()
	if err != nil {
		a.syncFailures++
	} else {
		a.syncFailures = 0
		if touched == nil {
			a.lastFull = start
		}
	}
	a.mu.Unlock()
	a.status.set(func(s *Status) {
		if err == nil && touched == nil {
			s.LastFullSync = start
		}
		s.Synced = true
		s.LastSync = start
		s.LastSyncDuration = elapsed.String()
		s.Services = len(a.rec.Services())
		s.Frontends = st.Frontends
		s.Backends = st.Backends
		s.LastSyncError = ""
		if err != nil {
			s.LastSyncError = err.Error()
		}
		if s.API == "connecting" {
			s.API = "connected"
		}
	})
	a.metrics.ObserveSync(elapsed, touched == nil, err, st.Frontends, st.Backends)
	if err != nil {
		a.log.Error("datapath sync failed; will retry", "err", err)
		return err
	}
	if a.proxyHealth != nil {
		a.proxyHealth.Updated(start)
	}
	if st.Drift || st.RevNatsFixed > 0 {
		a.log.Warn("the BPF maps differed from what kpr had programmed (changed outside kpr, or a failed write); corrected",
			"reread", st.Drift, "revnatFixed", st.RevNatsFixed)
	}
	if st.Upserted > 0 || st.Deleted > 0 || st.Full {
		a.log.Info("datapath synced", "full", st.Full, "upserted", st.Upserted, "deleted", st.Deleted,
			"frontends", st.Frontends, "backends", st.Backends, "took", elapsed)
	}
	a.notify.Status(fmt.Sprintf("serving %d Services (%d frontends, %d backends)", len(a.rec.Services()), st.Frontends, st.Backends))
	return nil
}

// frontends computes one Service's frontends from the informer caches: the socket LB's, and
// with the north-south datapath loaded, the external ones.
func (a *Agent) frontends(name string, node lbstate.Node) []lbstate.Frontend {
	var info lbstate.ServiceInfo // none unless computed below
	defer func() { a.setHealthCheck(name, info) }()
	obj, exists, err := a.services.GetIndexer().GetByKey(name)
	if err != nil || !exists {
		return nil
	}
	svc, ok := obj.(*v1.Service)
	if !ok {
		return nil
	}
	if why := lbstate.Ignored(svc); why != "" {
		return nil
	}
	objs, _ := a.slices.GetIndexer().ByIndex(byService, name)
	eps := make([]*discovery.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		if s, ok := o.(*discovery.EndpointSlice); ok {
			eps = append(eps, s)
		}
	}
	endpoints := lbstate.ServiceEndpoints(eps, node.Name)
	a.mu.Lock()
	ns := a.ns
	a.mu.Unlock()
	if ns == nil {
		return lbstate.Frontends(svc, endpoints, node)
	}
	info, fes, problems := lbstate.AllFrontends(svc, endpoints, node, ns.nodePort, lbstate.Options{ExternalClusterIP: a.cfg.ExternalClusterIP, NodePortSourceRanges: a.cfg.NodePortSourceRanges, Mode: lbstate.Mode(a.cfg.LoadBalancerMode)})
	a.report(name, problems)
	return fes
}

// setHealthCheck records what the health check port of Service name should answer.
func (a *Agent) setHealthCheck(name string, info lbstate.ServiceInfo) {
	if a.hc == nil {
		return
	}
	want := healthcheck.Service{Port: info.HealthCheckNodePort, LocalEndpoints: info.LocalReadyEndpoints}
	if old, ok := a.health[name]; old == want || !ok && want.Port == 0 {
		return
	}
	if want.Port == 0 {
		delete(a.health, name)
	} else {
		a.health[name] = want
	}
	a.healthChanged = true
}

// syncHealthChecks hands the health check ports to their server after a change, and again
// while a port could not be opened (in use by someone else), which it retries.
func (a *Agent) syncHealthChecks() {
	if a.hc == nil || (!a.healthChanged && a.healthErr == "") {
		return
	}
	a.healthChanged = false
	err := a.hc.Sync(maps.Clone(a.health))
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg != a.healthErr {
		if err != nil {
			a.log.Warn("health check node ports", "err", err)
		} else {
			a.log.Info("health check node ports all served", "ports", len(a.health))
		}
	}
	a.healthErr = msg
	n := len(a.health)
	a.status.set(func(s *Status) { s.HealthCheckPorts, s.HealthCheckError = n, msg })
}

// report logs a Service's problems when they differ from the last ones reported. Only the sync
// loop calls it.
func (a *Agent) report(name string, problems []lbstate.Problem) {
	var b strings.Builder
	for i, p := range problems {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(p.String())
	}
	if a.problems == nil {
		a.problems = map[string]string{}
	}
	if a.problems[name] == b.String() {
		return
	}
	if b.Len() == 0 {
		delete(a.problems, name)
		return
	}
	a.problems[name] = b.String()
	a.log.Warn("Service partly not served", "service", name, "problems", b.String())
}

func (a *Agent) closeNorthSouth() {
	if a.ns != nil && a.ns.np != nil {
		a.ns.np.Close()
	}
}

// followAddresses polls the devices' addresses: when they change, the SNAT addresses and the
// NodePort frontends follow. New devices (pods' veths) get the reply program.
func (a *Agent) followAddresses(ctx context.Context) {
	t := time.NewTicker(addressPollPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.mu.Lock()
		cur := a.ns
		a.mu.Unlock()
		if err := cur.syncReplies(); err != nil {
			a.log.Warn("attaching the reply program to new devices", "err", err)
		}
		found, err := discoverNorthSouth(a.cfg)
		if err != nil || !slices.Equal(found.devices, cur.devices) {
			continue // devices appear and go on restarts only, for now
		}
		if found.same(cur) {
			continue
		}
		if found.snat4 != cur.snat4 || found.snat6 != cur.snat6 {
			c, err := cur.np.Maps.Config()
			if err == nil {
				c.SNATAddr4, c.SNATAddr6 = found.snat4, found.snat6
				err = cur.np.Maps.SetConfig(c)
			}
			if err != nil {
				a.log.Error("updating the SNAT addresses", "err", err)
				continue
			}
		}
		found.np, found.devIdx, found.replies = cur.np, cur.devIdx, cur.replies
		a.mu.Lock()
		a.ns = found
		a.mu.Unlock()
		a.log.Info("node addresses changed", "nodePortAddresses", found.nodePort, "snat4", found.snat4, "snat6", found.snat6)
		a.status.set(func(s *Status) { s.NorthSouth = found.status() })
		if a.hc != nil && !slices.Equal(found.nodePort, cur.nodePort) {
			if err := a.hc.SetAddrs(found.nodePort); err != nil {
				a.log.Warn("health check node ports on the new addresses", "err", err)
			}
		}
		if !slices.Equal(found.nodePort, cur.nodePort) {
			a.guardBinds(found.nodePort)
		}
		a.tracker.touchAll()
	}
}

// addressPollPeriod is how often the devices' addresses are checked.
const addressPollPeriod = 2 * time.Second

func dropMaglevTables(m *bpf.NodePortMaps) error {
	ids, err := m.MaglevServices()
	if err != nil {
		return err
	}
	var errs []error
	for _, id := range ids {
		errs = append(errs, m.DeleteMaglevTable(id))
	}
	return errors.Join(errs...)
}

// nodeObject is this node's object from the informer, nil until it is known.
func (a *Agent) nodeObject() *v1.Node {
	if a.nodes == nil {
		return nil
	}
	obj, ok, err := a.nodes.GetStore().GetByKey(a.node.Name)
	if err != nil || !ok {
		return nil
	}
	n, _ := obj.(*v1.Node)
	return n
}

// Healthy is true while the sync loop runs and the datapath accepts writes. An unreachable API
// server is not unhealthy: the datapath keeps serving, and a restart would not help.
func (a *Agent) Healthy() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.lastLoop.IsZero() {
		return true
	}
	return time.Since(a.lastLoop) < 2*a.cfg.SyncPeriod+10*time.Second && a.syncFailures < 5
}

// tracker collects the Services that changed since the last sync.
type tracker struct {
	mu       sync.Mutex
	dirty    map[string]bool
	all      bool
	onChange func()
}

func (t *tracker) touch(name string) {
	if name == "" {
		return
	}
	t.mu.Lock()
	if t.dirty == nil {
		t.dirty = map[string]bool{}
	}
	t.dirty[name] = true
	fn := t.onChange
	t.mu.Unlock()
	if fn != nil {
		fn()
	}
}

func (t *tracker) touchAll() {
	t.mu.Lock()
	t.all = true
	fn := t.onChange
	t.mu.Unlock()
	if fn != nil {
		fn()
	}
}

func (t *tracker) take() ([]string, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]string, 0, len(t.dirty))
	for n := range t.dirty {
		out = append(out, n)
	}
	all := t.all
	t.dirty, t.all = nil, false
	return out, all
}

// guardBinds makes bind() in the node's network namespace refuse, with EADDRINUSE, a port a
// NodePort uses on addrs (none: the guard is off). A host process bound there would be
// shadowed by the tc programs without knowing it.
func (a *Agent) guardBinds(addrs []netip.Addr) {
	if len(addrs) > bpf.MaxBindGuardAddrs {
		a.log.Warn("bind() guard: only the first NodePort addresses are checked for wildcard binds",
			"addresses", len(addrs), "checked", bpf.MaxBindGuardAddrs)
		addrs = addrs[:bpf.MaxBindGuardAddrs]
	}
	cookie, err := netnsCookie()
	if err == nil {
		err = a.dp.Maps.SetBindGuard(cookie, addrs)
	}
	if err != nil {
		a.log.Warn("bind() guard for NodePorts not set: host processes may bind a NodePort's port and never see its traffic", "err", err)
	}
}

// netnsCookie is the cookie of the calling process's network namespace (SO_NETNS_COOKIE,
// Linux 5.14), which bpf_get_netns_cookie gives the BPF programs.
func netnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("SO_NETNS_COOKIE: %w", err)
	}
	return c, nil
}
