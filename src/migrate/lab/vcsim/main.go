// vcsim for the migrate lab: govmomi's simulator, started on a loopback address.
// Built by migrate.lab.vcsim from Debian's golang-github-vmware-govmomi-dev source.
// Prints one JSON line {"url": ..., "datastore_dir": ...} once listening, then serves
// until SIGTERM/SIGINT.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address")
	cert := flag.String("tlscert", "", "TLS certificate file (empty: plain http)")
	key := flag.String("tlskey", "", "TLS key file")
	user := flag.String("username", "user", "login user")
	pass := flag.String("password", "pass", "login password")
	dc := flag.Int("dc", 1, "datacenters")
	cluster := flag.Int("cluster", 1, "clusters per datacenter")
	clusterHost := flag.Int("cluster-host", 2, "hosts per cluster")
	host := flag.Int("standalone-host", 0, "standalone hosts per datacenter")
	vms := flag.Int("vm", 0, "VMs per resource pool")
	ds := flag.Int("ds", 1, "datastores")
	pg := flag.Int("pg", 1, "distributed portgroups")
	flag.Parse()

	model := simulator.VPX()
	model.Datacenter = *dc
	model.Cluster = *cluster
	model.ClusterHost = *clusterHost
	model.Host = *host
	model.Machine = *vms
	model.Datastore = *ds
	model.Portgroup = *pg
	model.Autostart = false
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	if *cert != "" {
		pair, err := tls.LoadX509KeyPair(*cert, *key)
		if err != nil {
			log.Fatal(err)
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	}
	server := model.Service.NewServer()
	out := map[string]string{"url": server.URL.String()}
	_ = json.NewEncoder(os.Stdout).Encode(out)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	server.Close()
	model.Remove()
}
