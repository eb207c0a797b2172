package healthcheck

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func get(t *testing.T, h http.Handler, path string) (int, health) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	var body health
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		t.Fatalf("%s: %v: %q", path, err, rec.Body.String())
	}
	return rec.Code, body
}

// The answers of kube-proxy's proxy health server: a change that waits longer than the timeout
// makes both endpoints 503 until a sync takes it; /healthz is also 503 for a node that is
// unknown, being deleted or tainted by the cluster autoscaler.
func TestProxyHealth(t *testing.T) {
	now := time.Unix(1000, 0)
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}}
	var current *v1.Node
	h := NewProxyHealth(time.Minute, func() *v1.Node { return current })
	h.now = func() time.Time { return now }
	srv := h.Handler()

	if code, body := get(t, srv, "/healthz"); code != 503 || *body.NodeEligible {
		t.Errorf("node unknown: /healthz %d %+v, want 503, not eligible", code, body)
	}
	if code, _ := get(t, srv, "/livez"); code != 200 {
		t.Errorf("node unknown: /livez %d, want 200", code)
	}
	current = node
	if code, body := get(t, srv, "/healthz"); code != 200 || !body.Healthy || !*body.NodeEligible || !body.LastUpdated.Equal(now) {
		t.Errorf("starting, nothing queued: /healthz %d %+v, want 200 with lastUpdated now", code, body)
	}

	h.QueuedUpdate()
	now = now.Add(59 * time.Second)
	if code, _ := get(t, srv, "/healthz"); code != 200 {
		t.Errorf("a change queued 59s ago: %d, want 200", code)
	}
	h.QueuedUpdate() // a later change does not move the oldest one
	now = now.Add(2 * time.Second)
	for _, path := range []string{"/healthz", "/livez"} {
		if code, body := get(t, srv, path); code != 503 || body.Healthy {
			t.Errorf("a change queued 61s ago: %s %d %+v, want 503", path, code, body)
		}
	}
	h.Updated(now)
	if code, _ := get(t, srv, "/healthz"); code != 200 {
		t.Errorf("after the sync: %d, want 200", code)
	}

	// A sync that started before a change does not take it.
	started := now
	now = now.Add(time.Second)
	h.QueuedUpdate()
	h.Updated(started)
	now = now.Add(2 * time.Minute)
	if code, _ := get(t, srv, "/livez"); code != 503 {
		t.Errorf("a change queued after the last sync started, 2 min ago: %d, want 503", code)
	}
	h.Updated(now)

	tainted := node.DeepCopy()
	tainted.Spec.Taints = []v1.Taint{{Key: toBeDeletedTaint, Effect: v1.TaintEffectNoSchedule}}
	deleted := node.DeepCopy()
	deleted.DeletionTimestamp = &metav1.Time{Time: now}
	for name, n := range map[string]*v1.Node{"tainted": tainted, "being deleted": deleted} {
		current = n
		if code, body := get(t, srv, "/healthz"); code != 503 || *body.NodeEligible {
			t.Errorf("%s: /healthz %d %+v, want 503, not eligible", name, code, body)
		}
		if code, _ := get(t, srv, "/livez"); code != 200 {
			t.Errorf("%s: /livez %d, want 200", name, code)
		}
	}
}
