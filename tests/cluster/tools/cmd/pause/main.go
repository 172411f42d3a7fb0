// The pod sandbox process of the test node (tests/cluster/node.py), doing what a pause container does: it holds
// the pod's namespaces and, as PID 1 of a pod that shares its process namespace (the chart's pods do), reaps the
// orphans re-parented to it; it exits 0 on SIGTERM or SIGINT. Built static (CGO_ENABLED=0): its image has no libc.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			return
		}
		for {
			var status syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
