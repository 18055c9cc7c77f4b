/*
 * ccoip_inet.h - socket address types of the PCCL C API.
 *
 * Part of PCCL-rs, a Rust implementation of PCCL (Prime Collective
 * Communications Library) that is source-compatible with PCCL 1.0.
 * These definitions (names, enumerator values, member order) match PCCL 1.0's
 * ccoip_inet.h exactly. Plain C99; usable from C++ (extern "C").
 *
 * An address is a protocol tag plus *both* an IPv4 and an IPv6 field (not a
 * union): only the field selected by `protocol` is read, the other is ignored.
 * Ports are in host byte order; address bytes are in network order, i.e. the
 * dotted-quad 10.1.2.3 is data = {10, 1, 2, 3}.
 */
#ifndef CCOIP_INET_H
#define CCOIP_INET_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Address family of a ccoip_inet_address_t. */
typedef enum ccoip_inet_protocol_t {
    inetIPv4 = 0,
    inetIPv6 = 1
} ccoip_inet_protocol_t;

/** IPv4 address, four bytes in network order (data[0] is the first octet). */
typedef struct ccoip_ipv4_address_t {
    uint8_t data[4];
} ccoip_ipv4_address_t;

/** IPv6 address, sixteen bytes in network order. */
typedef struct ccoip_ipv6_address_t {
    uint8_t data[16];
} ccoip_ipv6_address_t;

/** IP address: `protocol` selects which of `ipv4` / `ipv6` is meaningful. */
typedef struct ccoip_inet_address_t {
    ccoip_inet_protocol_t protocol;
    ccoip_ipv4_address_t ipv4;
    ccoip_ipv6_address_t ipv6;
} ccoip_inet_address_t;

/** IP address plus TCP port (host byte order). */
typedef struct ccoip_socket_address_t {
    ccoip_inet_address_t inet;
    uint16_t port;
} ccoip_socket_address_t;

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* CCOIP_INET_H */
