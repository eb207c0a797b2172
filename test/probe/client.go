package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// hello is what the client sends first, so the server answers at once instead of waiting to see
// whether an HTTP request follows.
const hello = "PROBE\n"

// maxCount bounds --count.
const maxCount = 1_000_000

// Result is one attempt, printed as one JSON line.
type Result struct {
	Attempt int    `json:"attempt"`
	OK      bool   `json:"ok"`
	Backend string `json:"backend,omitempty"` // NAME of the server that answered
	// Errno is the kernel's error name (ECONNREFUSED, EHOSTUNREACH, ...). A timeout without one
	// is reported as ETIMEDOUT with Timeout set.
	Errno   string `json:"errno,omitempty"`
	Err     string `json:"err,omitempty"`
	Timeout bool   `json:"timeout,omitempty"`
	// Peer is getpeername(2) for connected sockets (what a reverse translation must restore)
	// and the recvfrom(2) source for unconnected UDP.
	Peer      string  `json:"peer,omitempty"`
	Local     string  `json:"local,omitempty"`   // getsockname(2)
	SeenAs    string  `json:"seen_as,omitempty"` // the client address the server saw
	ElapsedMS float64 `json:"elapsed_ms"`
}

type clientFlags struct {
	target   string
	proto    string
	udpMode  string
	count    int
	timeout  time.Duration
	interval time.Duration
	reuse    bool
	// localPort, when not 0, is the source port every socket binds to (SO_REUSEADDR set), so a
	// flow's 5-tuple is known in advance.
	localPort int
}

func (f *clientFlags) register(fs *flag.FlagSet, timeout time.Duration) {
	fs.StringVar(&f.target, "target", "", "HOST:PORT to reach")
	fs.StringVar(&f.proto, "proto", "tcp", "tcp, udp, or icmp (an echo request to the target's address, port 0)")
	fs.StringVar(&f.udpMode, "udp-mode", "connected", "connected (connect+send+recv) or unconnected (sendto+recvfrom)")
	fs.DurationVar(&f.timeout, "timeout", timeout, "per attempt (client) or overall (ready)")
}

func (f *clientFlags) check() error {
	if _, _, err := net.SplitHostPort(f.target); err != nil {
		return fmt.Errorf("--target %q: %w", f.target, err)
	}
	if f.proto != "tcp" && f.proto != "udp" && f.proto != "icmp" {
		return fmt.Errorf("--proto %q: want tcp, udp or icmp", f.proto)
	}
	if f.udpMode != "connected" && f.udpMode != "unconnected" {
		return fmt.Errorf("--udp-mode %q: want connected or unconnected", f.udpMode)
	}
	if f.timeout <= 0 {
		return fmt.Errorf("--timeout %v: want > 0", f.timeout)
	}
	return nil
}

func client(args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	var f clientFlags
	f.register(fs, 2*time.Second)
	fs.IntVar(&f.count, "count", 1, "number of attempts, each on a new socket")
	fs.DurationVar(&f.interval, "interval", 0, "pause between attempts")
	fs.BoolVar(&f.reuse, "reuse", false, "one connected socket (TCP, or connected UDP) for every attempt, to show an established flow keeps working")
	fs.IntVar(&f.localPort, "local-port", 0, "source port to bind every socket to before connecting or sending, with SO_REUSEADDR (0: any). "+
		"UDP can reuse it at once; a TCP connection to the same target and port right after another fails while the first is in TIME_WAIT")
	fs.Parse(args)
	if err := f.check(); err != nil {
		return err
	}
	if f.localPort < 0 || f.localPort > 65535 {
		return fmt.Errorf("--local-port %d: want 0..65535", f.localPort)
	}
	if f.count < 1 || f.count > maxCount {
		return fmt.Errorf("--count %d: want 1..%d", f.count, maxCount)
	}
	enc := json.NewEncoder(os.Stdout)
	if f.reuse {
		return reuseAttempts(f, enc)
	}
	for i := 0; i < f.count; i++ {
		if i > 0 && f.interval > 0 {
			time.Sleep(f.interval)
		}
		r := attempt(f, f.timeout)
		r.Attempt = i
		if err := enc.Encode(r); err != nil {
			return err
		}
	}
	return nil
}

// reuseAttempts sends every request over one connected socket: the translation made at
// connect() must keep serving it, whatever happens to the agent in between.
func reuseAttempts(f clientFlags, enc *json.Encoder) error {
	if f.proto == "udp" && f.udpMode != "connected" {
		return fmt.Errorf("--reuse needs tcp or --udp-mode connected")
	}
	start := time.Now()
	d := f.dialer(start.Add(f.timeout))
	c, err := d.Dial(f.proto, f.target)
	if err != nil {
		r := Result{Err: err.Error(), ElapsedMS: float64(time.Since(start).Microseconds()) / 1000}
		var errno syscall.Errno
		if errors.As(err, &errno) {
			r.Errno = unix.ErrnoName(errno)
		}
		return enc.Encode(r)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	buf := make([]byte, 2048)
	for i := 0; i < f.count; i++ {
		if i > 0 && f.interval > 0 {
			time.Sleep(f.interval)
		}
		start := time.Now()
		r := Result{Attempt: i, Local: unmapped(c.LocalAddr())}
		c.SetDeadline(start.Add(f.timeout))
		var line string
		if r.Peer, err = peerName(c.(syscall.Conn)); err == nil {
			if _, err = c.Write([]byte(hello)); err == nil {
				if f.proto == "tcp" {
					line, err = br.ReadString('\n')
				} else {
					var n int
					n, err = c.Read(buf)
					line = string(buf[:n])
				}
			}
		}
		if err == nil {
			err = parseAnswer(&r, line)
		}
		r.ElapsedMS = float64(time.Since(start).Microseconds()) / 1000
		if err != nil {
			r.Err = err.Error()
		} else {
			r.OK = true
		}
		if err := enc.Encode(r); err != nil {
			return err
		}
	}
	return nil
}

func ready(args []string) error {
	fs := flag.NewFlagSet("ready", flag.ExitOnError)
	var f clientFlags
	f.register(fs, 10*time.Second)
	fs.Parse(args)
	if err := f.check(); err != nil {
		return err
	}
	deadline := time.Now().Add(f.timeout)
	var last Result
	for i := 0; ; i++ {
		per := min(time.Until(deadline), time.Second)
		if per <= 0 {
			return fmt.Errorf("%s %s not ready after %v: %s %s", f.proto, f.target, f.timeout, last.Errno, last.Err)
		}
		started := time.Now()
		last = attempt(f, per)
		last.Attempt = i
		if last.OK {
			return json.NewEncoder(os.Stdout).Encode(last)
		}
		// Refusals come back at once; do not spin on them.
		time.Sleep(time.Until(started.Add(100 * time.Millisecond)))
	}
}

func attempt(f clientFlags, timeout time.Duration) Result {
	start := time.Now()
	var r Result
	var err error
	switch {
	case f.proto == "icmp":
		err = echoAttempt(&r, f, start.Add(timeout))
	case f.proto == "tcp":
		err = tcpAttempt(&r, f, start.Add(timeout))
	case f.udpMode == "connected":
		err = udpConnectedAttempt(&r, f, start.Add(timeout))
	default:
		err = udpUnconnectedAttempt(&r, f, start.Add(timeout))
	}
	r.ElapsedMS = float64(time.Since(start).Microseconds()) / 1000
	if err != nil {
		r.Err = err.Error()
		var errno syscall.Errno
		if errors.As(err, &errno) {
			r.Errno = unix.ErrnoName(errno)
		}
		var ne net.Error
		if errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
			r.Timeout = true
			if r.Errno == "" {
				r.Errno = "ETIMEDOUT"
			}
		}
		return r
	}
	r.OK = true
	return r
}

// dialer binds to --local-port when one is given.
func (f clientFlags) dialer(deadline time.Time) net.Dialer {
	d := net.Dialer{Deadline: deadline}
	if f.localPort == 0 {
		return d
	}
	ip := net.IPv4zero
	if !f.targetIs4() {
		ip = net.IPv6unspecified
	}
	if f.proto == "tcp" {
		d.LocalAddr = &net.TCPAddr{IP: ip, Port: f.localPort}
	} else {
		d.LocalAddr = &net.UDPAddr{IP: ip, Port: f.localPort}
	}
	d.Control = reuseAddr
	return d
}

// targetIs4 reports whether the target is an IPv4 address (names count as IPv4 only if they
// are not IPv6 literals).
func (f clientFlags) targetIs4() bool {
	host, _, err := net.SplitHostPort(f.target)
	if err != nil {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err != nil || a.Unmap().Is4()
}

// reuseAddr sets SO_REUSEADDR before bind, so a fixed source port can be bound again at once.
func reuseAddr(_, _ string, rc syscall.RawConn) error {
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("SO_REUSEADDR: %w", serr)
	}
	return nil
}

func tcpAttempt(r *Result, f clientFlags, deadline time.Time) error {
	d := f.dialer(deadline)
	c, err := d.Dial("tcp", f.target)
	if err != nil {
		return err
	}
	defer c.Close()
	r.Local = unmapped(c.LocalAddr())
	if r.Peer, err = peerName(c.(*net.TCPConn)); err != nil {
		return err
	}
	c.SetDeadline(deadline)
	if _, err := c.Write([]byte(hello)); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read answer (got %q): %w", line, err)
	}
	return parseAnswer(r, line)
}

func udpConnectedAttempt(r *Result, f clientFlags, deadline time.Time) error {
	d := f.dialer(deadline)
	c, err := d.Dial("udp", f.target)
	if err != nil {
		return err
	}
	defer c.Close()
	r.Local = unmapped(c.LocalAddr())
	if r.Peer, err = peerName(c.(*net.UDPConn)); err != nil {
		return err
	}
	c.SetDeadline(deadline)
	if _, err := c.Write([]byte(hello)); err != nil {
		return err
	}
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	return parseAnswer(r, string(buf[:n]))
}

func udpUnconnectedAttempt(r *Result, f clientFlags, deadline time.Time) error {
	raddr, err := net.ResolveUDPAddr("udp", f.target)
	if err != nil {
		return err
	}
	network := "udp6"
	if raddr.IP.To4() != nil {
		network = "udp4"
	}
	var lc net.ListenConfig
	if f.localPort != 0 {
		lc.Control = reuseAddr
	}
	pc, err := lc.ListenPacket(context.Background(), network, fmt.Sprintf(":%d", f.localPort))
	if err != nil {
		return err
	}
	c := pc.(*net.UDPConn)
	defer c.Close()
	c.SetDeadline(deadline)
	if _, err := c.WriteToUDP([]byte(hello), raddr); err != nil {
		return err
	}
	r.Local = unmapped(c.LocalAddr())
	buf := make([]byte, 2048)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return err
	}
	r.Peer = netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String()
	return parseAnswer(r, string(buf[:n]))
}

// peerName asks the kernel (getpeername) rather than trusting the address that was dialed.
func peerName(c syscall.Conn) (string, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return "", err
	}
	var sa unix.Sockaddr
	var serr error
	if err := rc.Control(func(fd uintptr) { sa, serr = unix.Getpeername(int(fd)) }); err != nil {
		return "", err
	}
	if serr != nil {
		return "", fmt.Errorf("getpeername: %w", serr)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String(), nil
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port)).String(), nil
	}
	return "", fmt.Errorf("getpeername: unexpected %T", sa)
}

func unmapped(a net.Addr) string {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	default:
		return a.String()
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
}

// parseAnswer reads "NAME ip:port".
func parseAnswer(r *Result, line string) error {
	name, seen, ok := strings.Cut(strings.TrimSpace(line), " ")
	if !ok || name == "" || seen == "" {
		return fmt.Errorf("unexpected answer %q", line)
	}
	r.Backend, r.SeenAs = name, seen
	return nil
}

// echoAttempt sends one ICMP (ICMPv6) echo request to the target's address from a raw socket
// and waits for the matching reply; Peer is the reply's source.
func echoAttempt(r *Result, f clientFlags, deadline time.Time) error {
	ap, err := netip.ParseAddrPort(f.target)
	if err != nil {
		return err
	}
	dst := ap.Addr().Unmap()
	network, listen, reqType, replyType := "ip4:icmp", "0.0.0.0", icmp.Type(ipv4.ICMPTypeEcho), icmp.Type(ipv4.ICMPTypeEchoReply)
	proto := 1
	if dst.Is6() {
		network, listen, reqType, replyType = "ip6:ipv6-icmp", "::", ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
		proto = 58
	}
	c, err := icmp.ListenPacket(network, listen)
	if err != nil {
		return err
	}
	defer c.Close()
	id, seq := os.Getpid()&0xffff, int(time.Now().UnixNano()&0xffff)
	msg := icmp.Message{Type: reqType, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte(hello)}}
	b, err := msg.Marshal(nil) // ICMPv6: the kernel fills in the checksum of a raw socket
	if err != nil {
		return err
	}
	c.SetDeadline(deadline)
	if _, err := c.WriteTo(b, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return err
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != replyType {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id && e.Seq == seq {
			r.Peer = from.String()
			r.Backend = "echo"
			return nil
		}
	}
}
