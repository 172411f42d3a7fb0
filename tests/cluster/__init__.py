"""A real Kubernetes control plane for tests (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) on
127.0.0.1, with kwok standing in for kubelets. A regular package so `from cluster... import` never resolves to
some other `cluster` on sys.path."""
