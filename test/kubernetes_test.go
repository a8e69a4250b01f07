package test

import (
	"net"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/brokerd/brokerd/config"
	"go.yaml.in/yaml/v3"
)

// k8sDir holds the Kubernetes example.
const k8sDir = "../deploy/kubernetes"

// The parts of the manifests the test reads.
type (
	k8sObject struct {
		Kind     string `yaml:"kind"`
		Metadata struct {
			Name string `yaml:"name"`
		} `yaml:"metadata"`
		Spec       k8sSpec           `yaml:"spec"`
		StringData map[string]string `yaml:"stringData"`
	}
	k8sSpec struct {
		// StatefulSet
		ServiceName          string `yaml:"serviceName"`
		Replicas             int    `yaml:"replicas"`
		VolumeClaimTemplates []struct {
			Metadata struct {
				Name string `yaml:"name"`
			} `yaml:"metadata"`
		} `yaml:"volumeClaimTemplates"`
		Template struct {
			Spec struct {
				TerminationGracePeriodSeconds int            `yaml:"terminationGracePeriodSeconds"`
				Containers                    []k8sContainer `yaml:"containers"`
				Volumes                       []struct {
					Name   string `yaml:"name"`
					Secret struct {
						SecretName string `yaml:"secretName"`
					} `yaml:"secret"`
				} `yaml:"volumes"`
			} `yaml:"spec"`
		} `yaml:"template"`
		// Service
		ClusterIP                string    `yaml:"clusterIP"`
		PublishNotReadyAddresses bool      `yaml:"publishNotReadyAddresses"`
		Ports                    []k8sPort `yaml:"ports"`
	}
	k8sPort struct {
		Name          string `yaml:"name"`
		Port          int    `yaml:"port"`
		ContainerPort int    `yaml:"containerPort"`
		Protocol      string `yaml:"protocol"`
	}
	k8sProbe struct {
		HTTPGet *struct {
			Path string `yaml:"path"`
			Port string `yaml:"port"`
		} `yaml:"httpGet"`
		TCPSocket *struct {
			Port string `yaml:"port"`
		} `yaml:"tcpSocket"`
	}
	k8sContainer struct {
		Name  string    `yaml:"name"`
		Ports []k8sPort `yaml:"ports"`
		Env   []struct {
			Name      string `yaml:"name"`
			Value     string `yaml:"value"`
			ValueFrom *struct {
				FieldRef struct {
					FieldPath string `yaml:"fieldPath"`
				} `yaml:"fieldRef"`
			} `yaml:"valueFrom"`
		} `yaml:"env"`
		VolumeMounts []struct {
			Name      string `yaml:"name"`
			MountPath string `yaml:"mountPath"`
		} `yaml:"volumeMounts"`
		ReadinessProbe k8sProbe `yaml:"readinessProbe"`
		LivenessProbe  k8sProbe `yaml:"livenessProbe"`
		Lifecycle      struct {
			PreStop struct {
				Sleep struct {
					Seconds int `yaml:"seconds"`
				} `yaml:"sleep"`
			} `yaml:"preStop"`
		} `yaml:"lifecycle"`
	}
)

// k8sObjects reads every object of the example's YAML files, by kind and
// name ("Service/brokerd").
func k8sObjects(t *testing.T) map[string]k8sObject {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(k8sDir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s: %v", k8sDir, err)
	}
	objs := map[string]k8sObject{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range strings.Split(string(b), "\n---\n") {
			var o k8sObject
			if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
				t.Fatalf("%s, document %d: %v", f, i, err)
			}
			objs[o.Kind+"/"+o.Metadata.Name] = o
		}
	}
	return objs
}

// k8sVarRef is a $(VAR) reference in an env value.
var k8sVarRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// podEnv is the container's environment as the kubelet makes it for pod
// brokerd-0 in namespace shop: fieldRefs filled in, and $(VAR) expanded
// from the variables defined before it.
func podEnv(t *testing.T, c k8sContainer) (environ []string, vars map[string]string) {
	t.Helper()
	fields := map[string]string{"metadata.name": "brokerd-0", "metadata.namespace": "shop", "status.podIP": "10.244.1.7"}
	vars = map[string]string{}
	for _, e := range c.Env {
		v := e.Value
		if e.ValueFrom != nil {
			var ok bool
			if v, ok = fields[e.ValueFrom.FieldRef.FieldPath]; !ok {
				t.Fatalf("env %s: fieldRef %q not known to the test", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		}
		v = k8sVarRef.ReplaceAllStringFunc(v, func(ref string) string {
			name := k8sVarRef.FindStringSubmatch(ref)[1]
			val, ok := vars[name]
			if !ok {
				t.Errorf("env %s: $(%s) is not defined before it", e.Name, name)
			}
			return val
		})
		vars[e.Name] = v
		environ = append(environ, e.Name+"="+v)
	}
	return environ, vars
}

func portOf(t *testing.T, key, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	n, err2 := strconv.Atoi(p)
	if err != nil || err2 != nil {
		t.Fatalf("%s %q: not host:port", key, addr)
	}
	return n
}

// TestKubernetesExample: the StatefulSet's environment passes brokerd's
// own config loading and validation (so its keys and the security rules
// beyond loopback cannot drift), and the manifests agree with it: ports,
// probes, the headless Service the pods join and are named by, the files
// the Secret provides, the data volume and the shutdown timing.
func TestKubernetesExample(t *testing.T) {
	objs := k8sObjects(t)
	sts, ok := objs["StatefulSet/brokerd"]
	if !ok {
		t.Fatalf("no StatefulSet brokerd among %d objects", len(objs))
	}
	pod := sts.Spec.Template.Spec
	var c k8sContainer
	for _, cc := range pod.Containers {
		if cc.Name == "brokerd" {
			c = cc
		}
	}
	environ, _ := podEnv(t, c)
	cfg, err := config.Load(nil, environ)
	if err != nil {
		t.Fatalf("brokerd refuses the StatefulSet's environment:\n%v", err)
	}

	ports := map[string]int{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	for key, want := range map[string]string{
		"stomp.addr": "stomp", "admin.addr": "admin", "cluster.gossip_addr": "gossip-tcp", "cluster.peer_addr": "peer",
	} {
		addr := map[string]string{"stomp.addr": cfg.STOMP.Addr, "admin.addr": cfg.Admin.Addr,
			"cluster.gossip_addr": cfg.Cluster.GossipAddr, "cluster.peer_addr": cfg.Cluster.PeerAddr}[key]
		if got := portOf(t, key, addr); got != ports[want] {
			t.Errorf("%s listens on port %d, the container port %s is %d", key, got, want, ports[want])
		}
	}
	if ports["gossip-udp"] != ports["gossip-tcp"] {
		t.Errorf("gossip needs UDP and TCP on one port: %d and %d", ports["gossip-udp"], ports["gossip-tcp"])
	}
	if p := c.ReadinessProbe.HTTPGet; p == nil || p.Path != "/healthz" || p.Port != "admin" {
		t.Errorf("readiness probe %+v, want GET /healthz on the admin port", p)
	}
	if p := c.LivenessProbe; (p.HTTPGet == nil || p.HTTPGet.Port != "admin") && (p.TCPSocket == nil || p.TCPSocket.Port != "admin") {
		t.Errorf("liveness probe %+v, want one on the admin port", p)
	}

	// The pods are named by, and join through, the headless Service.
	headless, ok := objs["Service/"+sts.Spec.ServiceName]
	if !ok || headless.Spec.ClusterIP != "None" || !headless.Spec.PublishNotReadyAddresses {
		t.Fatalf("serviceName %q: want a headless Service (clusterIP None) publishing pods before they are ready, got %+v", sts.Spec.ServiceName, headless.Spec)
	}
	domain := sts.Spec.ServiceName + ".shop.svc.cluster.local"
	if want := net.JoinHostPort(domain, strconv.Itoa(ports["gossip-tcp"])); len(cfg.Cluster.Join) != 1 || cfg.Cluster.Join[0] != want {
		t.Errorf("cluster.join is %v, want [%s]", cfg.Cluster.Join, want)
	}
	if want := net.JoinHostPort("brokerd-0."+domain, strconv.Itoa(ports["stomp"])); cfg.STOMP.AdvertiseAddr != want {
		t.Errorf("stomp.advertise_addr is %q, want the pod's own name %q", cfg.STOMP.AdvertiseAddr, want)
	}
	hp := map[string]int{}
	for _, p := range headless.Spec.Ports {
		hp[p.Name+"/"+p.Protocol] = p.Port
	}
	if hp["gossip-tcp/TCP"] != ports["gossip-tcp"] || hp["gossip-udp/UDP"] != ports["gossip-tcp"] || hp["peer/TCP"] != ports["peer"] {
		t.Errorf("headless Service ports %v do not carry gossip (TCP and UDP) and peer links", hp)
	}
	if client, ok := objs["Service/brokerd"]; !ok || len(client.Spec.Ports) == 0 || client.Spec.Ports[0].Port != ports["stomp"] {
		t.Errorf("client Service brokerd: want STOMP on port %d, got %+v", ports["stomp"], client.Spec.Ports)
	}

	// The files the config names are in the mounted Secret, and the data
	// directory is the claimed volume.
	mounts := map[string]string{} // mount path -> volume
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	secretOf := map[string]string{} // volume -> secret
	for _, v := range pod.Volumes {
		secretOf[v.Name] = v.Secret.SecretName
	}
	for key, file := range map[string]string{
		"auth.users_file": cfg.Auth.UsersFile, "admin.token_file": cfg.Admin.TokenFile, "cluster.secret_key_file": cfg.Cluster.SecretKeyFile,
	} {
		secret := objs["Secret/"+secretOf[mounts[path.Dir(file)]]]
		if _, ok := secret.StringData[path.Base(file)]; !ok {
			t.Errorf("%s is %s: no Secret mounted at %s holds %s", key, file, path.Dir(file), path.Base(file))
		}
	}
	if v := mounts[cfg.Node.DataDir]; len(sts.Spec.VolumeClaimTemplates) != 1 || v != sts.Spec.VolumeClaimTemplates[0].Metadata.Name {
		t.Errorf("node.data_dir %s is not the StatefulSet's claimed volume (mounted: %v)", cfg.Node.DataDir, mounts)
	}

	if cfg.Cluster.ActiveMembers > sts.Spec.Replicas {
		t.Errorf("cluster.active_members %d is more than the %d replicas", cfg.Cluster.ActiveMembers, sts.Spec.Replicas)
	}
	// main gives a SIGTERM shutdown 10 s at most (shutdownHardCap in
	// cmd/brokerd/main.go), after the preStop pause.
	if grace, pause := pod.TerminationGracePeriodSeconds, c.Lifecycle.PreStop.Sleep.Seconds; grace < pause+10 {
		t.Errorf("terminationGracePeriodSeconds %d leaves less than 10 s after the %d s preStop pause", grace, pause)
	}
}
