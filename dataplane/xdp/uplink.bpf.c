// SPDX-License-Identifier: Apache-2.0
//
// Ocelot's XDP program for the node's uplink.
//
// It redirects only this node's tunnel traffic into AF_XDP sockets, keyed
// by receive queue, and passes everything else to the kernel untouched, so
// the host's own connectivity never depends on the dataplane:
//
//   - IPv4 UDP to the configured VXLAN port, for the configured local IP;
//   - IPv4 protocol 4 (IP in IP), for the local IP, when enabled.
//
// Everything else is XDP_PASS: other protocols and addresses, VLAN-tagged
// frames, IPv6, every IP fragment (first or not: user space cannot
// reassemble; the kernel does, and its sockets deliver the result to the
// dataplane's socket ports), frames too long for one AF_XDP buffer, and
// any frame arriving while the configuration says "off". A queue without
// a socket in the map passes too (the fallback action of
// bpf_redirect_map), and so does everything when the dataplane is gone:
// its sockets leave the map when they close.
//
// The configuration is one entry of an array map, written by user space
// (`port/xdp/program.rs`); addresses and ports in network byte order.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define FLAG_VXLAN 0x1
#define FLAG_IPIP 0x2

// Keep in sync with `XdpConfig` in port/xdp/program.rs.
struct config {
	__u32 local_ip;    // network order
	__u16 vxlan_port;  // network order
	__u16 flags;       // FLAG_*
	__u32 max_len;     // longest frame one AF_XDP buffer takes
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} ocelot_config SEC(".maps");

// One AF_XDP socket per receive queue of the uplink.
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} ocelot_xsks SEC(".maps");

SEC("xdp")
int ocelot_uplink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&ocelot_config, &zero);
	if (!cfg || !cfg->flags)
		return XDP_PASS;
	if (data_end - data > cfg->max_len)
		return XDP_PASS;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return XDP_PASS;
	__u32 ihl = ip->ihl * 4;
	if (ip->version != 4 || ihl < sizeof(*ip))
		return XDP_PASS;
	if (ip->daddr != cfg->local_ip)
		return XDP_PASS;
	// MF set or a non-zero offset: any fragment goes to the kernel.
	if (ip->frag_off & bpf_htons(0x3fff))
		return XDP_PASS;

	if (ip->protocol == IPPROTO_IPIP) {
		if (!(cfg->flags & FLAG_IPIP))
			return XDP_PASS;
		return bpf_redirect_map(&ocelot_xsks, ctx->rx_queue_index, XDP_PASS);
	}
	if (ip->protocol != IPPROTO_UDP || !(cfg->flags & FLAG_VXLAN))
		return XDP_PASS;
	if (ihl > 60)
		return XDP_PASS;
	struct udphdr *udp = (void *)ip + ihl;
	if ((void *)(udp + 1) > data_end)
		return XDP_PASS;
	if (udp->dest != cfg->vxlan_port)
		return XDP_PASS;
	return bpf_redirect_map(&ocelot_xsks, ctx->rx_queue_index, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
