package kubeadm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"
)

// dialAttemptTimeout bounds one connection attempt, so a black-holed endpoint (a powered-off
// control-plane node drops SYNs rather than refusing them) delays failover by seconds, not by
// the kernel's SYN retry budget.
const dialAttemptTimeout = 3 * time.Second

// failoverDialer connects to the first API server endpoint that accepts a TCP connection,
// starting with the one that last did, so a healthy endpoint keeps being used and a dead
// preferred one is not retried on every new connection.
type failoverDialer struct {
	addrs   []string // host:port, failover order
	timeout time.Duration
	dial    func(ctx context.Context, network, addr string) (net.Conn, error)
	last    atomic.Int32 // index into addrs of the endpoint that last accepted a connection
}

func newFailoverDialer(addrs []string) *failoverDialer {
	d := &net.Dialer{KeepAlive: 30 * time.Second}
	return &failoverDialer{addrs: addrs, timeout: dialAttemptTimeout, dial: d.DialContext}
}

// DialContext ignores addr: client-go asks for rest.Config.Host (Endpoints[0]), and the
// endpoint actually dialed is chosen here. TLS is negotiated by the caller afterwards and is
// verified against Endpoints[0]'s host name.
func (d *failoverDialer) DialContext(ctx context.Context, network, _ string) (net.Conn, error) {
	start := int(d.last.Load())
	var errs []error
	for i := range d.addrs {
		if err := ctx.Err(); err != nil {
			errs = append(errs, err)
			break
		}
		idx := (start + i) % len(d.addrs)
		attemptCtx, cancel := context.WithTimeout(ctx, d.timeout)
		conn, err := d.dial(attemptCtx, network, d.addrs[idx])
		cancel()
		if err == nil {
			d.last.Store(int32(idx))
			return conn, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", d.addrs[idx], err))
	}
	return nil, fmt.Errorf("no API server endpoint accepted a connection: %w", errors.Join(errs...))
}
