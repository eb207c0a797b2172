package metrics

import (
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// The figures a kube-proxy dashboard reads are there under kube-proxy's names, and count what
// the agent reported.
func TestMetrics(t *testing.T) {
	m := New()
	m.ObserveSync(3*time.Millisecond, true, nil, 12, 5)
	m.ObserveSync(time.Millisecond, false, nil, 14, 6)
	m.ObserveSync(time.Millisecond, false, errors.New("map full"), 0, 0)
	m.LastQueued.SetToCurrentTime()
	m.Healthz.WithLabelValues("200").Inc()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		"kubeproxy_sync_proxy_rules_duration_seconds_count 2",
		"kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
		"kubeproxy_sync_partial_proxy_rules_duration_seconds_count 1",
		"kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
		"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds ",
		`kubeproxy_proxy_healthz_total{code="200"} 1`,
		"kpr_datapath_frontends 14",
		"kpr_datapath_backends 6",
		"kpr_sync_failures_total 1",
		"process_resident_memory_bytes",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
