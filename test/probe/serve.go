package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// How long a TCP connection may stay silent before it gets the plain answer (clients such as nc
// send nothing), and how long an HTTP request may take to arrive.
const (
	firstLineWait = 500 * time.Millisecond
	httpWait      = 2 * time.Second
	maxHeaders    = 100
)

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	host, _ := os.Hostname()
	name := fs.String("name", host, "name to answer with")
	tcpPorts := fs.String("tcp", "", "comma-separated TCP ports")
	udpPorts := fs.String("udp", "", "comma-separated UDP ports")
	fs.Parse(args)
	if strings.ContainsAny(*name, " \n") || *name == "" {
		return fmt.Errorf("--name %q: want one word", *name)
	}
	tcp, err := parsePorts(*tcpPorts)
	if err != nil {
		return fmt.Errorf("--tcp: %w", err)
	}
	udp, err := parsePorts(*udpPorts)
	if err != nil {
		return fmt.Errorf("--udp: %w", err)
	}
	if len(tcp)+len(udp) == 0 {
		return errors.New("nothing to serve: give --tcp and/or --udp")
	}
	logger := log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds)

	var closers []func() error
	defer func() {
		for _, c := range closers {
			c()
		}
	}()
	for _, port := range tcp {
		// One dual-stack socket: IPv4 peers arrive as v4-mapped and are printed unmapped.
		ln, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
		if err != nil {
			return err
		}
		closers = append(closers, ln.Close)
		go acceptLoop(ln, *name, logger)
	}
	for _, port := range udp {
		// One socket per family, so each reply can leave from the address the datagram was
		// sent to (IP_PKTINFO / IPV6_PKTINFO); a dual-stack socket cannot do that for IPv4.
		n := 0
		for _, network := range []string{"udp4", "udp6"} {
			pc, err := net.ListenPacket(network, fmt.Sprintf(":%d", port))
			if err != nil {
				logger.Printf("udp %s port %d: %v", network, port, err)
				continue
			}
			closers = append(closers, pc.Close)
			n++
			if network == "udp4" {
				go udp4Loop(pc, *name, logger)
			} else {
				go udp6Loop(pc, *name, logger)
			}
		}
		if n == 0 {
			return fmt.Errorf("udp port %d: no socket", port)
		}
	}
	logger.Printf("probe serve %s: tcp %v udp %v", *name, tcp, udp)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	s := <-sig
	logger.Printf("probe serve %s: %v, exiting", *name, s)
	return nil
}

func parsePorts(s string) ([]int, error) {
	var ports []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := strconv.Atoi(f)
		if err != nil || p < 1 || p > 65535 {
			return nil, fmt.Errorf("bad port %q", f)
		}
		ports = append(ports, p)
	}
	return ports, nil
}

func acceptLoop(ln net.Listener, name string, logger *log.Logger) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			logger.Printf("accept: %v", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go handleTCP(c, name, logger)
	}
}

// answer is the one line probe serve replies with.
func answer(name string, peer netip.AddrPort) string {
	return fmt.Sprintf("%s %s\n", name, netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port()))
}

func handleTCP(c net.Conn, name string, logger *log.Logger) {
	defer c.Close()
	peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	line := answer(name, peer)
	logger.Printf("tcp %s -> %s", peer, c.LocalAddr())

	br := bufio.NewReaderSize(c, 4096)
	c.SetReadDeadline(time.Now().Add(firstLineWait))
	first, _ := br.ReadString('\n')
	if isHTTPRequest(first) {
		c.SetReadDeadline(time.Now().Add(httpWait))
		for i := 0; i < maxHeaders; i++ {
			h, err := br.ReadString('\n')
			if err != nil || strings.TrimRight(h, "\r\n") == "" {
				break
			}
		}
		body := line
		if strings.HasPrefix(first, "HEAD ") {
			body = ""
		}
		c.SetWriteDeadline(time.Now().Add(httpWait))
		fmt.Fprintf(c, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(line), body)
		return
	}
	c.SetWriteDeadline(time.Now().Add(httpWait))
	if _, err := c.Write([]byte(line)); err != nil || first != hello {
		return
	}
	// A client that keeps its connection (probe client --reuse) sends one hello per request;
	// answer each until it closes or goes quiet for longer than a reuse interval may be.
	for range maxReuse {
		c.SetReadDeadline(time.Now().Add(reuseIdle))
		next, err := br.ReadString('\n')
		if err != nil || next != hello {
			return
		}
		c.SetWriteDeadline(time.Now().Add(httpWait))
		if _, err := c.Write([]byte(line)); err != nil {
			return
		}
	}
}

// Bounds on a reused connection.
const (
	maxReuse  = 100_000
	reuseIdle = time.Minute
)

func isHTTPRequest(line string) bool {
	for _, m := range []string{"GET ", "HEAD ", "POST ", "PUT ", "DELETE ", "OPTIONS ", "PATCH "} {
		if strings.HasPrefix(line, m) {
			return true
		}
	}
	return false
}

func udp4Loop(pc net.PacketConn, name string, logger *log.Logger) {
	p := ipv4.NewPacketConn(pc)
	if err := p.SetControlMessage(ipv4.FlagDst|ipv4.FlagInterface, true); err != nil {
		logger.Printf("udp4 pktinfo: %v", err)
	}
	buf := make([]byte, 64<<10)
	for {
		_, cm, src, err := p.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			logger.Printf("udp4 read: %v", err)
			continue
		}
		peer := src.(*net.UDPAddr).AddrPort()
		var wcm *ipv4.ControlMessage
		if cm != nil && cm.Dst != nil && !cm.Dst.IsMulticast() && !cm.Dst.Equal(net.IPv4bcast) {
			wcm = &ipv4.ControlMessage{Src: cm.Dst}
		}
		logger.Printf("udp %s -> %v", peer, dstOf(cm))
		if _, err := p.WriteTo([]byte(answer(name, peer)), wcm, src); err != nil {
			logger.Printf("udp4 reply to %s: %v", peer, err)
		}
	}
}

func udp6Loop(pc net.PacketConn, name string, logger *log.Logger) {
	p := ipv6.NewPacketConn(pc)
	if err := p.SetControlMessage(ipv6.FlagDst|ipv6.FlagInterface, true); err != nil {
		logger.Printf("udp6 pktinfo: %v", err)
	}
	buf := make([]byte, 64<<10)
	for {
		_, cm, src, err := p.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			logger.Printf("udp6 read: %v", err)
			continue
		}
		peer := src.(*net.UDPAddr).AddrPort()
		var wcm *ipv6.ControlMessage
		if cm != nil && cm.Dst != nil && !cm.Dst.IsMulticast() {
			wcm = &ipv6.ControlMessage{Src: cm.Dst}
			if cm.Dst.IsLinkLocalUnicast() {
				wcm.IfIndex = cm.IfIndex
			}
		}
		logger.Printf("udp %s -> %v", peer, dstOf6(cm))
		if _, err := p.WriteTo([]byte(answer(name, peer)), wcm, src); err != nil {
			logger.Printf("udp6 reply to %s: %v", peer, err)
		}
	}
}

func dstOf(cm *ipv4.ControlMessage) net.IP {
	if cm == nil {
		return nil
	}
	return cm.Dst
}

func dstOf6(cm *ipv6.ControlMessage) net.IP {
	if cm == nil {
		return nil
	}
	return cm.Dst
}
