//! Network bring-up over netlink, and a DHCPv4 client. (Being written.)
