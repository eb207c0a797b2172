package kubeadm

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/discovery"
)

// fakeAPIServer is an httptest TLS server on 127.0.0.1 that answers /version and, like
// kube-apiserver, requires a client certificate from the cluster CA.
type fakeAPIServer struct {
	*httptest.Server
	mu       sync.Mutex
	clients  []string // CN of each request's client certificate
	agents   []string
	versions string
}

func newFakeAPIServer(t *testing.T, clientCA *x509.Certificate, gitVersion string) *fakeAPIServer {
	t.Helper()
	s := &fakeAPIServer{versions: gitVersion}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.clients = append(s.clients, r.TLS.PeerCertificates[0].Subject.CommonName)
		s.agents = append(s.agents, r.UserAgent())
		s.mu.Unlock()
		if r.URL.Path != "/version" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"major": "1", "minor": "36", "gitVersion": gitVersion})
	}))
	pool := x509.NewCertPool()
	pool.AddCert(clientCA)
	s.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	s.StartTLS()
	t.Cleanup(s.Close)
	return s
}

// deadEndpoint returns host:port of a loopback TLS server that has been shut down, so
// connections to it are refused.
func deadEndpoint(t *testing.T) string {
	t.Helper()
	s := httptest.NewTLSServer(http.NotFoundHandler())
	u, err := url.Parse(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	return u.Host
}

// TestRESTConfigFailsOver runs a real client-go request through Discover's RESTConfig when the
// first endpoint (from the kubeadm config) is down: it must reach the second (kubelet.conf's
// server) with the node's client certificate, and still verify the server's certificate.
func TestRESTConfigFailsOver(t *testing.T) {
	node := newTestPKI(t, "node11")
	live := newFakeAPIServer(t, node.caCert, "v1.36.3-live")
	liveCA := certPEM(live.Certificate())
	dead := deadEndpoint(t)
	_, deadPort, _ := net.SplitHostPort(dead)

	// writeNode lays out a node's files: a kubeadm config whose controlPlaneEndpoint is
	// cpEndpoint, and a kubelet.conf pointing at the live server with credentials referenced
	// by path, as kubeadm writes them.
	writeNode := func(t *testing.T, cpEndpoint string, serverCA []byte) Options {
		dir := t.TempDir()
		cfg := writeFile(t, filepath.Join(dir, "kubeadm.yaml"), fmt.Appendf(nil,
			"apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\ncontrolPlaneEndpoint: %q\n", cpEndpoint))
		writeFile(t, filepath.Join(dir, "pki", "ca.crt"), serverCA)
		writeFile(t, filepath.Join(dir, "pki", "kubelet-client-current.pem"), append(slices.Clone(node.certPEM), node.keyPEM...))
		kc := writeKubeconfig(t, dir, kubeletConf{
			server:   live.URL,
			caFile:   "pki/ca.crt",
			certFile: "pki/kubelet-client-current.pem",
			keyFile:  "pki/kubelet-client-current.pem",
		})
		return Options{KubeadmConfig: cfg, KubeletConf: kc}
	}
	serverVersion := func(t *testing.T, opts Options) (string, *Cluster, error) {
		t.Helper()
		c, err := Discover(opts)
		if err != nil {
			t.Fatal(err)
		}
		if c.RESTConfig == nil {
			t.Fatalf("no RESTConfig; Sources:\n  %s", strings.Join(c.Sources, "\n  "))
		}
		dc, err := discovery.NewDiscoveryClientForConfig(c.RESTConfig)
		if err != nil {
			t.Fatal(err)
		}
		v, err := dc.ServerVersion()
		if err != nil {
			return "", c, err
		}
		return v.GitVersion, c, nil
	}

	t.Run("first endpoint down", func(t *testing.T) {
		got, c, err := serverVersion(t, writeNode(t, dead, liveCA))
		if err != nil {
			t.Fatalf("request through RESTConfig: %v", err)
		}
		if want := []string{"https://" + dead, live.URL}; !slices.Equal(c.Endpoints, want) {
			t.Errorf("Endpoints = %q, want %q", c.Endpoints, want)
		}
		if got != "v1.36.3-live" {
			t.Errorf("server version %q, want v1.36.3-live from the second endpoint", got)
		}
		live.mu.Lock()
		defer live.mu.Unlock()
		if len(live.clients) == 0 || live.clients[len(live.clients)-1] != "system:node:node11" {
			t.Errorf("client certificates seen by the API server = %q, want system:node:node11", live.clients)
		}
		if len(live.agents) == 0 || live.agents[len(live.agents)-1] != "kpr" {
			t.Errorf("User-Agents seen by the API server = %q, want kpr", live.agents)
		}
	})

	t.Run("server certificate still verified", func(t *testing.T) {
		_, _, err := serverVersion(t, writeNode(t, dead, node.caPEM))
		if err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
			t.Errorf("request with the wrong CA: err = %v, want an unknown-authority error", err)
		}
	})

	// TLS is verified against Endpoints[0]'s host whichever endpoint answers; httptest's
	// certificate covers 127.0.0.1 but not "localhost".
	t.Run("TLS name is Endpoints[0]'s host", func(t *testing.T) {
		_, c, err := serverVersion(t, writeNode(t, "localhost:"+deadPort, liveCA))
		if err == nil || !strings.Contains(err.Error(), "localhost") {
			t.Errorf("err = %v, want a certificate error naming localhost", err)
		}
		checkSources(t, c.Sources, []string{"TLS verifies every endpoint against the name localhost"}, nil)
	})
}

// TestFailoverDialerOrder checks which endpoints are tried, in what order: from the one that
// last accepted a connection, wrapping around.
func TestFailoverDialerOrder(t *testing.T) {
	var attempts []string
	down := map[string]bool{}
	d := newFailoverDialer([]string{"a:1", "b:1", "c:1"})
	d.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		attempts = append(attempts, addr)
		if down[addr] {
			return nil, errors.New("connection refused")
		}
		c1, c2 := net.Pipe()
		c2.Close()
		return c1, nil
	}
	steps := []struct {
		down     []string
		attempts []string
		err      bool
	}{
		{down: []string{"a:1"}, attempts: []string{"a:1", "b:1"}},
		{down: nil, attempts: []string{"b:1"}}, // stays on b although a is back
		{down: []string{"b:1"}, attempts: []string{"b:1", "c:1"}},
		{down: []string{"c:1"}, attempts: []string{"c:1", "a:1"}}, // wraps around
		{down: []string{"a:1", "b:1", "c:1"}, attempts: []string{"a:1", "b:1", "c:1"}, err: true},
		{down: []string{"b:1", "c:1"}, attempts: []string{"a:1"}}, // a still the last good one
	}
	for i, s := range steps {
		attempts = nil
		clear(down)
		for _, a := range s.down {
			down[a] = true
		}
		conn, err := d.DialContext(context.Background(), "tcp", "ignored:443")
		if conn != nil {
			conn.Close()
		}
		if !slices.Equal(attempts, s.attempts) {
			t.Errorf("step %d: dialed %q, want %q", i, attempts, s.attempts)
		}
		if (err != nil) != s.err {
			t.Errorf("step %d: err = %v, want error %v", i, err, s.err)
		}
		if err != nil {
			for _, a := range s.down {
				if !strings.Contains(err.Error(), a) {
					t.Errorf("step %d: error %q does not name %s", i, err, a)
				}
			}
		}
	}
}

// TestFailoverDialerTimeout: an endpoint that never answers (SYNs dropped) costs one attempt
// timeout, not the caller's whole deadline.
func TestFailoverDialerTimeout(t *testing.T) {
	d := newFailoverDialer([]string{"blackhole:1", "live:1"})
	d.timeout = 50 * time.Millisecond
	d.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if addr == "blackhole:1" {
			<-ctx.Done()
			return nil, ctx.Err()
		}
		c1, c2 := net.Pipe()
		c2.Close()
		return c1, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	conn, err := d.DialContext(ctx, "tcp", "ignored:443")
	if err != nil {
		t.Fatalf("DialContext: %v", err)
	}
	conn.Close()
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("failover took %v, want about one attempt timeout (50ms)", el)
	}

	// A cancelled caller stops the failover instead of trying every endpoint.
	cancelled, cancelNow := context.WithCancel(context.Background())
	cancelNow()
	if _, err := d.DialContext(cancelled, "tcp", "ignored:443"); !errors.Is(err, context.Canceled) {
		t.Errorf("DialContext with a cancelled context: err = %v, want context.Canceled", err)
	}
}
