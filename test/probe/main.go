// Command probe is the traffic tool the kpr end-to-end tests run inside sandbox namespaces.
//
//	probe serve  --name NAME [--tcp PORT[,PORT]] [--udp PORT[,PORT]]
//	probe client --target HOST:PORT [--proto tcp|udp] [--udp-mode connected|unconnected]
//	             [--count N] [--timeout 2s] [--interval 0]
//	probe ready  --target HOST:PORT [--proto tcp|udp] [--timeout 10s]
//
// serve answers every TCP connection and UDP datagram with one line, "NAME <peer-ip>:<peer-port>",
// i.e. who answered and whom it saw; it speaks just enough HTTP/1.0 for curl. client makes N
// independent attempts (a new socket each) and prints one JSON object per attempt; failed
// attempts are results too, so it exits 0 whenever its flags were valid. ready waits until one
// attempt succeeds and exits 1 if none did in time.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "client":
		err = client(os.Args[2:])
	case "ready":
		err = ready(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "probe %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: probe serve|client|ready [flags] (probe <command> -h for flags)")
	os.Exit(2)
}
