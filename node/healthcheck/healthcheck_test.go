package healthcheck

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Tests listen on the loopback addresses only, never on every address.
var (
	lo4 = netip.MustParseAddr("127.0.0.1")
	lo6 = netip.MustParseAddr("::1")
)

// timeout bounds every network operation of a test.
const timeout = 5 * time.Second

// loopbacks returns 127.0.0.1, and ::1 where the test host has it.
func loopbacks(t *testing.T) []netip.Addr {
	t.Helper()
	if haveIPv6() {
		return []netip.Addr{lo4, lo6}
	}
	t.Log("no ::1 on this host; testing 127.0.0.1 only")
	return []netip.Addr{lo4}
}

func haveIPv6() bool {
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

// freePort returns a port that was free on every addr a moment ago.
func freePort(t *testing.T, addrs []netip.Addr) uint16 {
	t.Helper()
next:
	for range 50 {
		ln, err := net.Listen("tcp", netip.AddrPortFrom(addrs[0], 0).String())
		if err != nil {
			t.Fatal(err)
		}
		p := uint16(ln.Addr().(*net.TCPAddr).Port)
		ln.Close()
		for _, a := range addrs[1:] {
			ln, err := net.Listen("tcp", netip.AddrPortFrom(a, p).String())
			if err != nil {
				continue next
			}
			ln.Close()
		}
		return p
	}
	t.Fatalf("no port free on all of %v", addrs)
	return 0
}

// freePorts returns n distinct free ports.
func freePorts(t *testing.T, addrs []netip.Addr, n int) []uint16 {
	t.Helper()
	var ps []uint16
	for len(ps) < n {
		if p := freePort(t, addrs); !slices.Contains(ps, p) {
			ps = append(ps, p)
		}
	}
	return ps
}

func newServer(t *testing.T, addrs []netip.Addr, healthy func() bool) *Server {
	t.Helper()
	s := New(addrs, healthy, nil)
	t.Cleanup(func() { mustClose(t, s) })
	return s
}

// mustClose closes s, failing the test if Close fails or hangs.
func mustClose(t *testing.T, s *Server) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(2 * shutdownTimeout):
		t.Errorf("Close did not return within %v", 2*shutdownTimeout)
	}
}

func mustSync(t *testing.T, s *Server, svcs map[string]Service) {
	t.Helper()
	if err := s.Sync(svcs); err != nil {
		t.Fatalf("Sync(%v): %v", svcs, err)
	}
}

// reply is one answer as a client sees it.
type reply struct {
	code   int
	header http.Header
	body   string
}

// request sends one request on a new connection.
func request(t *testing.T, method string, a netip.Addr, port uint16, path string) reply {
	t.Helper()
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Timeout: timeout, Transport: tr}
	req, err := http.NewRequest(method, "http://"+netip.AddrPortFrom(a, port).String()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, req.URL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: body: %v", method, req.URL, err)
	}
	return reply{resp.StatusCode, resp.Header, string(b)}
}

// conn is one kept-alive connection, to see whether the listener behind it
// survives a change.
type conn struct {
	c net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, a netip.Addr, port uint16) *conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", netip.AddrPortFrom(a, port).String(), timeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &conn{c, bufio.NewReader(c)}
}

// get sends one GET on the connection and reads the answer.
func (c *conn) get() (reply, error) {
	if err := c.c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return reply{}, err
	}
	if _, err := io.WriteString(c.c, "GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n"); err != nil {
		return reply{}, err
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		return reply{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return reply{}, err
	}
	return reply{resp.StatusCode, resp.Header, string(b)}, nil
}

func (c *conn) mustGet(t *testing.T) reply {
	t.Helper()
	r, err := c.get()
	if err != nil {
		t.Fatalf("kept-alive connection to %s: %v", c.c.RemoteAddr(), err)
	}
	return r
}

// wantClosed checks that the connection was closed by the server.
func (c *conn) wantClosed(t *testing.T) {
	t.Helper()
	if r, err := c.get(); err == nil {
		t.Errorf("connection to %s still answers: %d %s", c.c.RemoteAddr(), r.code, r.body)
	}
}

// wantPortClosed checks that nothing listens on a:port: a connection is
// refused and the port can be bound.
func wantPortClosed(t *testing.T, a netip.Addr, port uint16) {
	t.Helper()
	ap := netip.AddrPortFrom(a, port).String()
	if c, err := net.DialTimeout("tcp", ap, timeout); err == nil {
		c.Close()
		t.Errorf("%s accepts connections", ap)
		return
	}
	ln, err := net.Listen("tcp", ap)
	if err != nil {
		t.Errorf("%s cannot be bound: %v", ap, err)
		return
	}
	ln.Close()
}

// payload is the body's JSON, with kube-proxy's field names.
type payload struct {
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	LocalEndpoints      int  `json:"localEndpoints"`
	ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
}

// wantAnswer checks a reply against kube-proxy's answer for a Service.
func wantAnswer(t *testing.T, what string, r reply, key string, endpoints int, healthy bool, withBody bool) {
	t.Helper()
	code := http.StatusServiceUnavailable
	if endpoints > 0 && healthy {
		code = http.StatusOK
	}
	if r.code != code {
		t.Errorf("%s: status %d, want %d", what, r.code, code)
	}
	for name, want := range map[string]string{
		"Content-Type":                     "application/json",
		"X-Content-Type-Options":           "nosniff",
		"X-Load-Balancing-Endpoint-Weight": strconv.Itoa(endpoints),
	} {
		if got := r.header.Values(name); !slices.Equal(got, []string{want}) {
			t.Errorf("%s: header %s = %q, want [%q]", what, name, got, want)
		}
	}
	if !withBody {
		if r.body != "" {
			t.Errorf("%s: body %q, want none", what, r.body)
		}
		return
	}
	ns, name, _ := strings.Cut(key, "/")
	if want := string(body(&answer{ns, name, both(endpoints)}, endpoints, healthy)); r.body != want {
		t.Errorf("%s: body\n%s\nwant\n%s", what, r.body, want)
	}
	var p payload
	if err := json.Unmarshal([]byte(r.body), &p); err != nil {
		t.Fatalf("%s: body is not JSON: %v\n%s", what, err, r.body)
	}
	if p.Service.Namespace != ns || p.Service.Name != name || p.LocalEndpoints != endpoints || p.ServiceProxyHealthy != healthy {
		t.Errorf("%s: body says %+v, want %s with %d endpoints, healthy %v", what, p, key, endpoints, healthy)
	}
}

// TestBody pins the body to the bytes kube-proxy v1.36.3 sends (its
// dedented template, printed by running it).
func TestBody(t *testing.T) {
	for _, tc := range []struct {
		a       answer
		healthy bool
		want    string
	}{{
		answer{"ns", "web", both(3)}, true,
		"{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": true\n}",
	}, {
		answer{"kube-system", "dns-lb", both(0)}, false,
		"{\n\t\"service\": {\n\t\t\"namespace\": \"kube-system\",\n\t\t\"name\": \"dns-lb\"\n\t},\n\t\"localEndpoints\": 0,\n\t\"serviceProxyHealthy\": false\n}",
	}} {
		if got := string(body(&tc.a, tc.a.endpoints[0], tc.healthy)); got != tc.want {
			t.Errorf("body(%+v, %v) =\n%q\nwant\n%q", tc.a, tc.healthy, got, tc.want)
		}
	}
}

func TestAnswers(t *testing.T) {
	addrs := loopbacks(t)
	port := freePort(t, addrs)
	var healthy atomic.Bool
	s := newServer(t, addrs, healthy.Load)

	for _, tc := range []struct {
		name      string
		endpoints int
		healthy   bool
		code      int
	}{
		{"endpoints", 3, true, http.StatusOK},
		{"one endpoint", 1, true, http.StatusOK},
		{"no endpoints", 0, true, http.StatusServiceUnavailable},
		{"proxy unhealthy", 2, false, http.StatusServiceUnavailable},
		{"no endpoints, proxy unhealthy", 0, false, http.StatusServiceUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mustSync(t, s, map[string]Service{"ns/web": {Port: port, LocalEndpoints: both(tc.endpoints)}})
			healthy.Store(tc.healthy)
			for _, a := range addrs {
				// Every method and path gets the answer, as from kube-proxy.
				for _, req := range []struct{ method, path string }{
					{http.MethodGet, "/healthz"}, {http.MethodGet, "/"}, {http.MethodPost, "/any/path"}, {http.MethodHead, "/"},
				} {
					what := fmt.Sprintf("%s http://%s%s", req.method, netip.AddrPortFrom(a, port), req.path)
					r := request(t, req.method, a, port, req.path)
					if r.code != tc.code {
						t.Errorf("%s: status %d, want %d", what, r.code, tc.code)
					}
					wantAnswer(t, what, r, "ns/web", tc.endpoints, tc.healthy, req.method != http.MethodHead)
				}
			}
		})
	}
}

// TestUpdateKeepsListener changes what a port answers and checks that the
// same socket answers it: a kept-alive connection would be closed with its
// listener.
func TestUpdateKeepsListener(t *testing.T) {
	addrs := loopbacks(t)
	port := freePort(t, addrs)
	s := newServer(t, addrs, nil)

	mustSync(t, s, map[string]Service{"ns/web": {Port: port}})
	var conns []*conn
	for _, a := range addrs {
		c := dial(t, a, port)
		wantAnswer(t, "before", c.mustGet(t), "ns/web", 0, true, true)
		conns = append(conns, c)
	}

	for _, step := range []struct {
		name string
		svcs map[string]Service
		key  string
		n    int
	}{
		{"count up", map[string]Service{"ns/web": {Port: port, LocalEndpoints: both(2)}}, "ns/web", 2},
		{"count down", map[string]Service{"ns/web": {Port: port, LocalEndpoints: both(1)}}, "ns/web", 1},
		{"port passes to another Service", map[string]Service{"ns/api": {Port: port, LocalEndpoints: both(4)}}, "ns/api", 4},
	} {
		mustSync(t, s, step.svcs)
		for _, c := range conns {
			wantAnswer(t, step.name+" on "+c.c.RemoteAddr().String(), c.mustGet(t), step.key, step.n, true, true)
		}
	}
}

func TestPortChange(t *testing.T) {
	addrs := loopbacks(t)
	ports := freePorts(t, addrs, 2)
	s := newServer(t, addrs, nil)

	mustSync(t, s, map[string]Service{"ns/web": {Port: ports[0], LocalEndpoints: both(1)}})
	c := dial(t, addrs[0], ports[0])
	wantAnswer(t, "old port", c.mustGet(t), "ns/web", 1, true, true)

	mustSync(t, s, map[string]Service{"ns/web": {Port: ports[1], LocalEndpoints: both(1)}})
	c.wantClosed(t)
	for _, a := range addrs {
		wantPortClosed(t, a, ports[0])
		wantAnswer(t, "new port", request(t, http.MethodGet, a, ports[1], "/"), "ns/web", 1, true, true)
	}
}

func TestRemoval(t *testing.T) {
	addrs := loopbacks(t)
	ports := freePorts(t, addrs, 2)
	s := newServer(t, addrs, nil)

	mustSync(t, s, map[string]Service{
		"ns/a": {Port: ports[0], LocalEndpoints: both(1)},
		"ns/b": {Port: ports[1], LocalEndpoints: both(2)},
	})
	ca, cb := dial(t, addrs[0], ports[0]), dial(t, addrs[0], ports[1])
	wantAnswer(t, "a", ca.mustGet(t), "ns/a", 1, true, true)
	wantAnswer(t, "b", cb.mustGet(t), "ns/b", 2, true, true)

	mustSync(t, s, map[string]Service{"ns/b": {Port: ports[1], LocalEndpoints: both(2)}})
	ca.wantClosed(t)
	for _, a := range addrs {
		wantPortClosed(t, a, ports[0])
	}
	wantAnswer(t, "b kept", cb.mustGet(t), "ns/b", 2, true, true)

	mustSync(t, s, nil)
	cb.wantClosed(t)
	for _, a := range addrs {
		wantPortClosed(t, a, ports[1])
	}
}

func TestPortInUse(t *testing.T) {
	addrs := loopbacks(t)
	ports := freePorts(t, addrs, 2)
	blocked, free := ports[0], ports[1]
	s := newServer(t, addrs, nil)

	// Something else holds the port on 127.0.0.1 (and only there).
	other, err := net.Listen("tcp", netip.AddrPortFrom(lo4, blocked).String())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	svcs := map[string]Service{
		"ns/blocked": {Port: blocked, LocalEndpoints: both(1)},
		"ns/ok":      {Port: free, LocalEndpoints: both(1)},
	}
	for try := range 2 { // still failing when retried
		err := s.Sync(svcs)
		if err == nil {
			t.Fatalf("Sync %d with port %d in use: no error", try, blocked)
		}
		msg := err.Error()
		for _, want := range []string{"ns/blocked", "spec.healthCheckNodePort", strconv.Itoa(int(blocked)), "127.0.0.1"} {
			if !strings.Contains(msg, want) {
				t.Errorf("Sync %d error %q does not name %q", try, msg, want)
			}
		}
		if strings.Contains(msg, "ns/ok") {
			t.Errorf("Sync %d error %q blames ns/ok", try, msg)
		}
		for _, a := range addrs {
			wantAnswer(t, "ok", request(t, http.MethodGet, a, free, "/"), "ns/ok", 1, true, true)
		}
		if slices.Contains(addrs, lo6) {
			// Served where the port could be opened.
			wantAnswer(t, "blocked on ::1", request(t, http.MethodGet, lo6, blocked, "/"), "ns/blocked", 1, true, true)
		}
	}

	other.Close()
	mustSync(t, s, svcs)
	for _, a := range addrs {
		wantAnswer(t, "blocked, after the port freed", request(t, http.MethodGet, a, blocked, "/"), "ns/blocked", 1, true, true)
		wantAnswer(t, "ok", request(t, http.MethodGet, a, free, "/"), "ns/ok", 1, true, true)
	}
}

func TestDuplicatePort(t *testing.T) {
	addrs := []netip.Addr{lo4}
	port := freePort(t, addrs)
	s := newServer(t, addrs, nil)

	err := s.Sync(map[string]Service{
		"ns/b": {Port: port, LocalEndpoints: both(2)},
		"ns/a": {Port: port, LocalEndpoints: both(1)},
	})
	want := fmt.Sprintf("Service ns/b spec.healthCheckNodePort %d", port)
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("Sync with a shared port: error %v, want one naming %q", err, want)
	}
	wantAnswer(t, "shared port", request(t, http.MethodGet, lo4, port, "/"), "ns/a", 1, true, true)

	mustSync(t, s, map[string]Service{"ns/b": {Port: port, LocalEndpoints: both(2)}})
	wantAnswer(t, "after ns/a left", request(t, http.MethodGet, lo4, port, "/"), "ns/b", 2, true, true)
}

func TestSyncInput(t *testing.T) {
	addrs := []netip.Addr{lo4}
	port := freePort(t, addrs)
	for _, tc := range []struct {
		name    string
		svcs    map[string]Service
		ports   []uint16
		wantErr string
	}{
		{"no health check port", map[string]Service{"ns/web": {LocalEndpoints: both(3)}}, nil, ""},
		{"key without namespace", map[string]Service{"web": {Port: port}}, nil, `"web"`},
		{"one Service", map[string]Service{"ns/web": {Port: port}}, []uint16{port}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, addrs, nil)
			err := s.Sync(tc.svcs)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("Sync: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("Sync: error %v, want one naming %s", err, tc.wantErr)
			}
			s.mu.Lock()
			got := slices.Sorted(func(yield func(uint16) bool) {
				for p := range s.ports {
					if !yield(p) {
						return
					}
				}
			})
			s.mu.Unlock()
			if !slices.Equal(got, tc.ports) {
				t.Errorf("ports %v, want %v", got, tc.ports)
			}
		})
	}
}

func TestListenHosts(t *testing.T) {
	for _, tc := range []struct {
		name  string
		addrs []netip.Addr
		want  []string
		err   bool
	}{
		{"none means all", nil, []string{""}, false},
		{"empty means all", []netip.Addr{}, []string{""}, false},
		{"one", []netip.Addr{lo4}, []string{"127.0.0.1"}, false},
		{"both families, in order", []netip.Addr{lo6, lo4}, []string{"::1", "127.0.0.1"}, false},
		{"duplicates and mapped", []netip.Addr{lo4, netip.MustParseAddr("::ffff:127.0.0.1"), lo4}, []string{"127.0.0.1"}, false},
		{"zone kept", []netip.Addr{netip.MustParseAddr("fe80::1%eth0")}, []string{"fe80::1%eth0"}, false},
		{"invalid skipped", []netip.Addr{{}, lo4}, []string{"127.0.0.1"}, true},
		{"only invalid is nowhere, not all", []netip.Addr{{}}, []string{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := listenHosts(tc.addrs)
			if !slices.Equal(got, tc.want) || (got == nil) != (tc.want == nil) {
				t.Errorf("listenHosts(%v) = %q, want %q", tc.addrs, got, tc.want)
			}
			if (err != nil) != tc.err {
				t.Errorf("listenHosts(%v) error %v, want error: %v", tc.addrs, err, tc.err)
			}
		})
	}
}

func TestSetAddrs(t *testing.T) {
	if !haveIPv6() {
		t.Skip("needs ::1 as a second loopback address")
	}
	los := []netip.Addr{lo4, lo6}
	port := freePort(t, los)
	s := newServer(t, []netip.Addr{lo4}, nil)

	mustSync(t, s, map[string]Service{"ns/web": {Port: port, LocalEndpoints: both(1)}})
	c4 := dial(t, lo4, port)
	wantAnswer(t, "127.0.0.1", c4.mustGet(t), "ns/web", 1, true, true)
	wantPortClosed(t, lo6, port)

	if err := s.SetAddrs(los); err != nil {
		t.Fatalf("SetAddrs(%v): %v", los, err)
	}
	wantAnswer(t, "127.0.0.1 kept", c4.mustGet(t), "ns/web", 1, true, true)
	c6 := dial(t, lo6, port)
	wantAnswer(t, "::1 added", c6.mustGet(t), "ns/web", 1, true, true)

	if err := s.SetAddrs([]netip.Addr{lo6}); err != nil {
		t.Fatalf("SetAddrs(::1): %v", err)
	}
	c4.wantClosed(t)
	wantPortClosed(t, lo4, port)
	wantAnswer(t, "::1 kept", c6.mustGet(t), "ns/web", 1, true, true)

	// A new Service is opened on the current addresses only.
	other := freePort(t, los)
	mustSync(t, s, map[string]Service{"ns/web": {Port: port, LocalEndpoints: both(1)}, "ns/api": {Port: other}})
	wantAnswer(t, "new Service on ::1", request(t, http.MethodGet, lo6, other, "/"), "ns/api", 0, true, true)
	wantPortClosed(t, lo4, other)
}

func TestClose(t *testing.T) {
	addrs := loopbacks(t)
	ports := freePorts(t, addrs, 2)
	s := newServer(t, addrs, nil)

	mustSync(t, s, map[string]Service{
		"ns/a": {Port: ports[0], LocalEndpoints: both(1)},
		"ns/b": {Port: ports[1]},
	})
	c := dial(t, addrs[0], ports[0])
	wantAnswer(t, "before Close", c.mustGet(t), "ns/a", 1, true, true)

	mustClose(t, s)
	c.wantClosed(t)
	for _, a := range addrs {
		for _, p := range ports {
			wantPortClosed(t, a, p)
		}
	}
	if err := s.Sync(map[string]Service{"ns/a": {Port: ports[0]}}); err == nil {
		t.Error("Sync after Close: no error")
	}
	if err := s.SetAddrs(addrs); err == nil {
		t.Error("SetAddrs after Close: no error")
	}
	for _, a := range addrs {
		wantPortClosed(t, a, ports[0])
	}
	mustClose(t, s) // a second time
}

// TestCloseWaitsForHandlers holds a request inside healthy while Close runs
// and checks that Close returns only after the handler did: within the grace
// period the request is answered, after it the connection is closed but Close
// still waits, so healthy is never called once Close has returned.
func TestCloseWaitsForHandlers(t *testing.T) {
	for _, tc := range []struct {
		name        string
		grace, hold time.Duration // hold: how long the handler runs after Close began
		answered    bool
	}{
		{"within the grace period", shutdownTimeout, 200 * time.Millisecond, true},
		{"past the grace period", 50 * time.Millisecond, 300 * time.Millisecond, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addrs := []netip.Addr{lo4}
			port := freePort(t, addrs)
			entered, release := make(chan struct{}), make(chan struct{})
			var calls atomic.Int32
			s := newServer(t, addrs, func() bool {
				if calls.Add(1) == 1 {
					close(entered)
					<-release
				}
				return true
			})
			s.grace = tc.grace
			mustSync(t, s, map[string]Service{"ns/web": {Port: port, LocalEndpoints: both(1)}})

			type result struct {
				r   reply
				err error
			}
			results := make(chan result, 1)
			c := dial(t, lo4, port)
			go func() {
				r, err := c.get()
				results <- result{r, err}
			}()
			select {
			case <-entered:
			case <-time.After(timeout):
				close(release)
				t.Fatal("request never reached the handler")
			}

			closed := make(chan error, 1)
			go func() { closed <- s.Close() }()
			select {
			case err := <-closed:
				close(release)
				t.Fatalf("Close returned (%v) while a handler was running", err)
			case <-time.After(tc.hold):
			}
			close(release)
			select {
			case err := <-closed:
				if err != nil {
					t.Errorf("Close: %v", err)
				}
			case <-time.After(timeout):
				t.Fatal("Close did not return after the handler finished")
			}
			if n := calls.Load(); n != 1 {
				t.Errorf("healthy called %d times, want 1", n)
			}
			select {
			case res := <-results:
				switch {
				case tc.answered && res.err != nil:
					t.Errorf("request in flight at Close: %v", res.err)
				case tc.answered:
					wantAnswer(t, "request in flight at Close", res.r, "ns/web", 1, true, true)
				case res.err == nil:
					t.Errorf("request held past the grace period was answered: %d %s", res.r.code, res.r.body)
				}
			case <-time.After(timeout):
				t.Fatal("request in flight never ended")
			}
		})
	}
}

// both is the same count of local endpoints in each family.
func both(n int) [2]int { return [2]int{n, n} }

// Each family's address answers with that family's count, as kube-proxy's per-family health
// check servers do.
func TestAnswerPerFamily(t *testing.T) {
	if !haveIPv6() {
		t.Skip("needs ::1")
	}
	los := []netip.Addr{lo4, lo6}
	port := freePort(t, los)
	s := newServer(t, los, nil)
	mustSync(t, s, map[string]Service{"ns/web": {Port: port, LocalEndpoints: [2]int{2, 0}}})
	r4 := request(t, http.MethodGet, lo4, port, "/healthz")
	if r4.code != http.StatusOK {
		t.Errorf("IPv4: status %d, want 200", r4.code)
	}
	wantAnswer(t, "IPv4", r4, "ns/web", 2, true, true)
	r6 := request(t, http.MethodGet, lo6, port, "/healthz")
	if r6.code != http.StatusServiceUnavailable {
		t.Errorf("IPv6: status %d, want 503 (no IPv6 endpoint)", r6.code)
	}
	wantAnswer(t, "IPv6", r6, "ns/web", 0, true, true)
}
