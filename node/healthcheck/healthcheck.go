package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ReadHeaderTimeout bounds how long a connection may take to send a request's
// headers. Probes send them at once; the bound only stops clients that connect
// and stall from holding sockets forever.
const ReadHeaderTimeout = 10 * time.Second

// shutdownTimeout bounds how long Close lets in-flight requests finish before
// it closes their connections.
const shutdownTimeout = 5 * time.Second

// Service is one Service whose health check port is served.
type Service struct {
	Port uint16 // spec.healthCheckNodePort; 0 means none, and the Service is skipped
	// LocalEndpoints are the local ready endpoints of each IP family, [0] IPv4 and [1] IPv6,
	// as kube-proxy counts them. kube-proxy runs one proxier per family, each with its own
	// health check server on that family's addresses; so a request to one of the node's IPv4
	// addresses is answered with the IPv4 count, and one to an IPv6 address with the IPv6 count.
	LocalEndpoints [2]int
}

// Server serves the health check ports of a set of Services. Its methods may
// be called from several goroutines.
type Server struct {
	healthy func() bool
	log     *slog.Logger
	grace   time.Duration // shutdownTimeout; shorter in tests

	mu     sync.Mutex // serialises Sync, SetAddrs and Close
	hosts  []string   // hosts to listen on; "" is every address
	ports  map[uint16]*port
	closed bool

	serving sync.WaitGroup // one per running http.Server.Serve

	// gate lets Close wait for handlers that outlive the shutdown timeout;
	// once stopped is set no handler calls healthy again.
	gate    sync.RWMutex
	stopped bool
}

// port is one health check port, served on every listen host.
type port struct {
	num     uint16
	srv     *Server
	answer  atomic.Pointer[answer] // replaced whole, so a request sees one Service's state
	servers map[string]*http.Server
}

// answer is what a port currently reports.
type answer struct {
	namespace, name string
	endpoints       [2]int // by family, as Service.LocalEndpoints
}

// New returns a Server that listens on addrs: each port is opened on each of
// them, and an empty addrs means every address of both families (":port").
// Invalid addresses are skipped (and logged); IPv4-mapped IPv6 addresses are
// listened on as IPv4. healthy reports whether the proxy itself is healthy
// (serviceProxyHealthy in the answer); it is called once per request, must
// return promptly, and nil means always healthy. log may be nil.
func New(addrs []netip.Addr, healthy func() bool, log *slog.Logger) *Server {
	if healthy == nil {
		healthy = func() bool { return true }
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	hosts, err := listenHosts(addrs)
	if err != nil {
		log.Warn("health check listen addresses", "error", err)
	}
	return &Server{healthy: healthy, log: log, grace: shutdownTimeout, hosts: hosts, ports: map[uint16]*port{}}
}

// listenHosts turns listen addresses into the hosts to listen on. No
// addresses means every address (""), but a list whose addresses are all
// invalid means none: it must not widen to every address.
func listenHosts(addrs []netip.Addr) ([]string, error) {
	if len(addrs) == 0 {
		return []string{""}, nil
	}
	var errs []error
	hosts := []string{}
	for i, a := range addrs {
		if !a.IsValid() {
			errs = append(errs, fmt.Errorf("healthcheck: listen address %d of %d is invalid, skipped", i+1, len(addrs)))
			continue
		}
		if h := a.Unmap().String(); !slices.Contains(hosts, h) {
			hosts = append(hosts, h)
		}
	}
	return hosts, errors.Join(errs...)
}

// Sync makes the served set exactly svcs, keyed "namespace/name": it closes
// the ports no Service uses any more, changes the answers of the others in
// place, and opens the new ones. Ports that cannot be opened, on some or all
// listen addresses, are reported in the error and retried by the next Sync;
// everything else is served regardless. If two Services have the same port
// (the API server prevents it) the first by key is served and the other
// reported.
func (s *Server) Sync(svcs map[string]Service) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("healthcheck: server closed")
	}

	var errs []error
	want := map[uint16]*answer{}
	owner := map[uint16]string{}
	for _, key := range slices.Sorted(maps.Keys(svcs)) {
		svc := svcs[key]
		if svc.Port == 0 {
			continue
		}
		ns, name, ok := strings.Cut(key, "/")
		if !ok {
			errs = append(errs, fmt.Errorf("healthcheck: Service key %q is not namespace/name", key))
			continue
		}
		if first, dup := owner[svc.Port]; dup {
			errs = append(errs, fmt.Errorf("healthcheck: Service %s spec.healthCheckNodePort %d: already served for Service %s", key, svc.Port, first))
			continue
		}
		owner[svc.Port] = key
		want[svc.Port] = &answer{namespace: ns, name: name, endpoints: svc.LocalEndpoints}
	}

	// Close first, so that a port freed here can be reopened below.
	for num, p := range s.ports {
		if want[num] == nil {
			s.log.Debug("closing health check port", "port", num)
			p.closeAll()
			delete(s.ports, num)
		}
	}
	for _, num := range slices.Sorted(maps.Keys(want)) {
		p := s.ports[num]
		if p == nil {
			p = &port{num: num, srv: s, servers: map[string]*http.Server{}}
			s.ports[num] = p
		}
		// Stored before the port is opened, so no request finds it empty.
		p.answer.Store(want[num])
		for _, err := range s.open(p) {
			errs = append(errs, fmt.Errorf("healthcheck: Service %s spec.healthCheckNodePort %d: %w", owner[num], num, err))
		}
	}
	return errors.Join(errs...)
}

// SetAddrs changes the listen addresses, with New's meaning. Ports stay open
// on the addresses that remain, close on those removed and open on those
// added; failures are reported as in Sync and retried by the next Sync.
func (s *Server) SetAddrs(addrs []netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("healthcheck: server closed")
	}
	hosts, err := listenHosts(addrs)
	errs := []error{err}
	s.hosts = hosts
	// Close every removed host before opening any new one: a port open on all
	// addresses conflicts with the same port on a single address.
	for _, p := range s.ports {
		for h, srv := range p.servers {
			if !slices.Contains(hosts, h) {
				p.close(h, srv)
			}
		}
	}
	for _, num := range slices.Sorted(maps.Keys(s.ports)) {
		p := s.ports[num]
		a := p.answer.Load()
		for _, err := range s.open(p) {
			errs = append(errs, fmt.Errorf("healthcheck: Service %s/%s spec.healthCheckNodePort %d: %w", a.namespace, a.name, num, err))
		}
	}
	return errors.Join(errs...)
}

// Close stops every listener, lets in-flight requests finish for up to
// shutdownTimeout, then closes their connections and waits for their handlers
// to return. Sync and SetAddrs fail after Close; a second Close does nothing.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true

	ctx, cancel := context.WithTimeout(context.Background(), s.grace)
	defer cancel()
	var errs []error
	for _, p := range s.ports {
		for _, srv := range p.servers {
			if err := srv.Shutdown(ctx); err != nil && ctx.Err() != nil {
				// Shutdown has closed the listener; only connections with a
				// request in flight remain.
				_ = srv.Close()
			} else if err != nil {
				errs = append(errs, fmt.Errorf("healthcheck: close port %d: %w", p.num, err))
			}
		}
	}
	s.ports = map[uint16]*port{}
	s.serving.Wait()

	s.gate.Lock()
	s.stopped = true
	s.gate.Unlock()
	return errors.Join(errs...)
}

// open listens on every host where p is not open yet, and returns the errors.
func (s *Server) open(p *port) []error {
	var errs []error
	for _, h := range s.hosts {
		if p.servers[h] != nil {
			continue
		}
		addr := net.JoinHostPort(h, strconv.Itoa(int(p.num)))
		// Listen here rather than in ListenAndServe, so that a port in use is
		// an error of this call.
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		srv := &http.Server{
			Handler:           p,
			ReadHeaderTimeout: ReadHeaderTimeout,
			ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		}
		p.servers[h] = srv
		s.log.Debug("opened health check port", "address", ln.Addr().String())
		s.serving.Go(func() {
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				s.log.Warn("health check port stopped", "address", addr, "error", err)
			}
		})
	}
	return errs
}

func (p *port) closeAll() {
	for h, srv := range p.servers {
		p.close(h, srv)
	}
}

// close stops one listener and its connections at once, without waiting for
// handlers: a removed port must be free for the next open.
func (p *port) close(h string, srv *http.Server) {
	if err := srv.Close(); err != nil {
		p.srv.log.Warn("closing health check port", "port", p.num, "host", h, "error", err)
	}
	delete(p.servers, h)
}

// ServeHTTP answers any method and path, as kube-proxy does.
func (p *port) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s := p.srv
	s.gate.RLock()
	defer s.gate.RUnlock()
	if s.stopped {
		panic(http.ErrAbortHandler)
	}
	a := p.answer.Load()
	healthy := s.healthy()
	// The family of the node address the request came to (an IPv4 client of a dual-stack
	// socket shows as IPv4-mapped, which To4 sees through).
	endpoints := a.endpoints[0]
	if la, ok := r.Context().Value(http.LocalAddrContextKey).(*net.TCPAddr); ok && la.IP.To4() == nil {
		endpoints = a.endpoints[1]
	}

	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Load-Balancing-Endpoint-Weight", strconv.Itoa(endpoints))
	if endpoints != 0 && healthy {
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_, _ = w.Write(body(a, endpoints, healthy))
}

// body is kube-proxy's answer body. It is formatted, not marshalled, to keep
// kube-proxy's layout and quoting exactly (names are DNS labels, so %q
// quoting is also valid JSON).
func body(a *answer, endpoints int, healthy bool) []byte {
	return fmt.Appendf(nil, "{\n\t\"service\": {\n\t\t\"namespace\": %q,\n\t\t\"name\": %q\n\t},\n\t\"localEndpoints\": %d,\n\t\"serviceProxyHealthy\": %v\n}",
		a.namespace, a.name, endpoints, healthy)
}
