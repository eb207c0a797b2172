// Package metrics serves kpr's Prometheus metrics on metricsBindAddress, under kube-proxy's
// metric names where kube-proxy has the same figure, so existing dashboards and alerts keep
// working after the switch.
package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the agent's metrics; the zero value is not usable, use New.
type Metrics struct {
	reg *prometheus.Registry

	// kube-proxy's names and meanings (pkg/proxy/metrics).
	SyncDuration        prometheus.Histogram // kubeproxy_sync_proxy_rules_duration_seconds
	SyncFullDuration    prometheus.Histogram // kubeproxy_sync_full_proxy_rules_duration_seconds
	SyncPartialDuration prometheus.Histogram // kubeproxy_sync_partial_proxy_rules_duration_seconds
	LastSync            prometheus.Gauge     // kubeproxy_sync_proxy_rules_last_timestamp_seconds
	LastQueued          prometheus.Gauge     // kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds
	Healthz             *prometheus.CounterVec
	Livez               *prometheus.CounterVec

	// kpr's own.
	Frontends    prometheus.Gauge
	Backends     prometheus.Gauge
	SyncFailures prometheus.Counter
}

// New registers the metrics (and Go's and the process's) in a registry of their own.
func New() *Metrics {
	buckets := prometheus.ExponentialBuckets(0.001, 2, 15) // kube-proxy's: 1 ms to 16 s
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		SyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kubeproxy_sync_proxy_rules_duration_seconds",
			Help: "SyncProxyRules latency in seconds: one kpr sync of the datapath, full or partial", Buckets: buckets}),
		SyncFullDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kubeproxy_sync_full_proxy_rules_duration_seconds",
			Help: "SyncProxyRules latency in seconds for full resyncs: every Service recomputed and the BPF maps checked", Buckets: buckets}),
		SyncPartialDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kubeproxy_sync_partial_proxy_rules_duration_seconds",
			Help: "SyncProxyRules latency in seconds for partial resyncs: only the Services that changed", Buckets: buckets}),
		LastSync: prometheus.NewGauge(prometheus.GaugeOpts{Name: "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
			Help: "The last time the datapath was successfully synced"}),
		LastQueued: prometheus.NewGauge(prometheus.GaugeOpts{Name: "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
			Help: "The last time a sync of the datapath was queued"}),
		Healthz: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kubeproxy_proxy_healthz_total",
			Help: "Cumulative proxy healthz HTTP status"}, []string{"code"}),
		Livez: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kubeproxy_proxy_livez_total",
			Help: "Cumulative proxy livez HTTP status"}, []string{"code"}),
		Frontends: prometheus.NewGauge(prometheus.GaugeOpts{Name: "kpr_datapath_frontends",
			Help: "Frontends (Service address, port and protocol, per scope) programmed in the BPF maps"}),
		Backends: prometheus.NewGauge(prometheus.GaugeOpts{Name: "kpr_datapath_backends",
			Help: "Backends programmed in the BPF maps"}),
		SyncFailures: prometheus.NewCounter(prometheus.CounterOpts{Name: "kpr_sync_failures_total",
			Help: "Syncs of the datapath that failed and were retried"}),
	}
	m.reg.MustRegister(m.SyncDuration, m.SyncFullDuration, m.SyncPartialDuration, m.LastSync, m.LastQueued,
		m.Healthz, m.Livez, m.Frontends, m.Backends, m.SyncFailures,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ObserveSync records one sync that took d; full says whether it recomputed everything.
func (m *Metrics) ObserveSync(d time.Duration, full bool, err error, frontends, backends int) {
	if err != nil {
		m.SyncFailures.Inc()
		return
	}
	m.SyncDuration.Observe(d.Seconds())
	if full {
		m.SyncFullDuration.Observe(d.Seconds())
	} else {
		m.SyncPartialDuration.Observe(d.Seconds())
	}
	m.LastSync.SetToCurrentTime()
	m.Frontends.Set(float64(frontends))
	m.Backends.Set(float64(backends))
}

// Handler serves /metrics.
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	return mux
}
