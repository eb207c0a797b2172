package healthcheck

import (
	"encoding/json"
	"net"
	"net/http"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
)

// toBeDeletedTaint is the taint the cluster autoscaler puts on a node it is about to remove;
// a load balancer should stop sending new flows there (kube-proxy's healthz says 503).
const toBeDeletedTaint = "ToBeDeletedByClusterAutoscaler"

// ProxyHealth is kube-proxy's health server (its healthzBindAddress, by default 0.0.0.0:10256),
// which cloud load balancers probe for Services with externalTrafficPolicy Cluster:
//
//   - /livez answers 200 unless a change to Services has waited longer than the timeout
//     (2 × syncPeriod, as kube-proxy) to reach the datapath, then 503;
//   - /healthz answers the same, and also 503 while the node is being deleted or carries the
//     cluster autoscaler's ToBeDeletedByClusterAutoscaler taint, or is not known yet, so load
//     balancers drain it first.
//
// Both answer kube-proxy's JSON: lastUpdated (now when healthy, as kube-proxy does for
// compatibility; else the last sync), currentTime, healthy, and for /healthz nodeEligible.
type ProxyHealth struct {
	timeout time.Duration
	node    func() *v1.Node
	now     func() time.Time
	// Answered, when set, is told each answer: the path and the HTTP status (for metrics).
	Answered func(path string, code int)

	mu            sync.Mutex
	lastUpdated   time.Time
	oldestPending time.Time // zero: no change waiting for a sync
}

// NewProxyHealth makes the server; node returns the node's object (nil: not known yet).
func NewProxyHealth(timeout time.Duration, node func() *v1.Node) *ProxyHealth {
	return &ProxyHealth{timeout: timeout, node: node, now: time.Now}
}

// QueuedUpdate notes that a change waits for a sync; the oldest waiting one counts.
func (h *ProxyHealth) QueuedUpdate() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.oldestPending.IsZero() {
		h.oldestPending = h.now()
	}
}

// Updated notes a successful sync of every change queued before started.
func (h *ProxyHealth) Updated(started time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastUpdated = h.now()
	if !h.oldestPending.IsZero() && !h.oldestPending.After(started) {
		h.oldestPending = time.Time{}
	}
}

// health is kube-proxy's answer body.
type health struct {
	LastUpdated  time.Time `json:"lastUpdated"`
	CurrentTime  time.Time `json:"currentTime"`
	NodeEligible *bool     `json:"nodeEligible,omitempty"`
	Healthy      bool      `json:"healthy"`
}

func (h *ProxyHealth) state() health {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	return health{
		LastUpdated: h.lastUpdated,
		CurrentTime: now,
		Healthy:     h.oldestPending.IsZero() || now.Sub(h.oldestPending) < h.timeout,
	}
}

func (h *ProxyHealth) nodeEligible() bool {
	n := h.node()
	if n == nil || n.DeletionTimestamp != nil {
		return false
	}
	for _, t := range n.Spec.Taints {
		if t.Key == toBeDeletedTaint {
			return false
		}
	}
	return true
}

// Handler serves /healthz and /livez.
func (h *ProxyHealth) Handler() http.Handler {
	mux := http.NewServeMux()
	answer := func(w http.ResponseWriter, path string, st health, ok bool) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		code := http.StatusServiceUnavailable
		if ok {
			st.LastUpdated = st.CurrentTime
			code = http.StatusOK
		}
		if h.Answered != nil {
			h.Answered(path, code)
		}
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(st)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		st := h.state()
		eligible := h.nodeEligible()
		st.NodeEligible = &eligible
		answer(w, "/healthz", st, st.Healthy && eligible)
	})
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) {
		st := h.state()
		answer(w, "/livez", st, st.Healthy)
	})
	return mux
}

// Serve listens on addr (host:port) and serves h in the background until stop is called; the
// error is the listener's (the address is taken, or not this node's). The agent serves
// ProxyHealth's and the metrics' handlers with it.
func Serve(addr string, h http.Handler) (stop func(), err error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: ReadHeaderTimeout}
	go func() { _ = srv.Serve(l) }()
	return func() { _ = srv.Close() }, nil
}
