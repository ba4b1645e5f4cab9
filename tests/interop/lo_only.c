/* LD_PRELOAD shim for libnice-based clients (GStreamer webrtcbin) in the interop tests.
 *
 * libnice never gathers candidates on interfaces flagged IFF_LOOPBACK, and the tests may
 * send traffic only to loopback. This getifaddrs() wrapper shows the process "lo" alone,
 * with IFF_LOOPBACK cleared, so libnice offers 127.0.0.1 and nothing else. Other entries
 * stay in the list (glibc's freeifaddrs() frees it as one block) but lose their address
 * and their UP/RUNNING flags. Built by tests/test_interop.py with the system gcc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <stddef.h>
#include <string.h>

int getifaddrs(struct ifaddrs **ifap) {
	static int (*real_getifaddrs)(struct ifaddrs **);
	if (real_getifaddrs == NULL)
		real_getifaddrs = (int (*)(struct ifaddrs **))dlsym(RTLD_NEXT, "getifaddrs");
	int rc = real_getifaddrs(ifap);
	if (rc != 0 || ifap == NULL)
		return rc;
	for (struct ifaddrs *entry = *ifap; entry != NULL; entry = entry->ifa_next) {
		if (entry->ifa_name != NULL && strcmp(entry->ifa_name, "lo") == 0) {
			entry->ifa_flags &= ~IFF_LOOPBACK;
		} else {
			entry->ifa_flags &= ~(IFF_UP | IFF_RUNNING);
			entry->ifa_addr = NULL;
			entry->ifa_netmask = NULL;
		}
	}
	return rc;
}
