"""The fixed Rego rules of Veil's Kata agent policy; `kata_policy` appends the per-pod data.

The kata agent asks `data.agent_policy.<Request>` for every ttRPC call, with the request's JSON
as `input`; a rule that is undefined or not `true` refuses the call (and so does an evaluation
error, unless `AllowRequestsFailingPolicy` is true, which Veil pins to false).

The text is valid Rego v0 (with the future keywords imported) and v1, so both the kata agent's
regorus and OPA accept it. Every byte of it is measured: edit it only on purpose.
"""

from __future__ import annotations

from typing import Final

# Calls kubelet and the kata shim make during a pod's life that carry nothing the workload's
# secrets depend on: lifecycle, networking set-up, status and resource accounting.
ALLOWED_CALLS: Final = (
    "AddARPNeighborsRequest",
    "DestroySandboxRequest",
    "GetMetricsRequest",
    "GetOOMEventRequest",
    "GuestDetailsRequest",
    "ListInterfacesRequest",
    "ListRoutesRequest",
    "MemHotplugByProbeRequest",
    "OnlineCPUMemRequest",
    "RemoveContainerRequest",
    "RemoveStaleVirtiofsShareMountsRequest",
    "SignalProcessRequest",
    "StartContainerRequest",
    "StatsContainerRequest",
    "UpdateContainerRequest",
    "UpdateInterfaceRequest",
    "UpdateRoutesRequest",
    "WaitProcessRequest",
)

# Calls refused outright. Exec, stdin, tty and tracing would give the host a way into a running
# container; SetPolicy would replace this very policy; the clock, entropy, swap, pause and image
# pulls outside CreateContainer are host influence the workload never needs.
DENIED_CALLS: Final = (
    "AddSwapRequest",
    "CloseStdinRequest",
    "ExecProcessRequest",
    "PauseContainerRequest",
    "PullImageRequest",
    "ReseedRandomDevRequest",
    "ResumeContainerRequest",
    "SetGuestDateTimeRequest",
    "SetPolicyRequest",
    "StartTracingRequest",
    "StopTracingRequest",
    "TtyWinResizeRequest",
    "UpdateEphemeralMountsRequest",
    "WriteStreamRequest",
)

# Checked against policy_data below.
CHECKED_CALLS: Final = (
    "CopyFileRequest",
    "CreateContainerRequest",
    "CreateSandboxRequest",
    "ReadStreamRequest",
)

RULES: Final = r"""
default AllowRequestsFailingPolicy := false

CreateSandboxRequest if {
	empty(object.get(input, "guest_hook_path", ""))
	empty(object.get(input, "storages", []))
	not input.sandbox_pidns
}

# Container output, for `kubectl logs`: exec is refused, so these are only the containers' own
# stdout and stderr, which Veil's images never write secrets to.
ReadStreamRequest if {
	true
}

CopyFileRequest if {
	not contains(input.path, "..")
	some pattern in policy_data.copy_file_paths
	regex.match(pattern, input.path)
}

CreateContainerRequest if {
	oci := input.OCI
	oci.Annotations["io.kubernetes.cri.container-type"] == "sandbox"
	namespace_ok(oci.Annotations)
	oci.Process.Args == policy_data.sandbox.args
	every entry in oci.Process.Env {
		entry in policy_data.sandbox.env
	}
	every mount in oci.Mounts {
		standard_mount(mount)
	}
	hooks_ok(oci)
	linux_ok(oci.Linux)
	every storage in object.get(input, "storages", []) {
		storage.driver == "image_guest_pull"
		storage.source in policy_data.sandbox.images
	}
}

CreateContainerRequest if {
	oci := input.OCI
	oci.Annotations["io.kubernetes.cri.container-type"] == "container"
	namespace_ok(oci.Annotations)
	some c in policy_data.containers
	oci.Annotations["io.kubernetes.cri.container-name"] == c.name
	oci.Annotations["io.kubernetes.cri.image-name"] == c.image
	args_ok(oci.Process.Args, c)
	process_ok(oci.Process, c)
	env_ok(oci.Process.Env, c)
	every mount in oci.Mounts {
		mount_ok(mount, c)
	}
	oci.Root.Readonly == c.read_only_root
	hooks_ok(oci)
	linux_ok(oci.Linux)
	storages_ok(object.get(input, "storages", []), c)
}

# Every argument exactly as pinned, but for the model reference's values (see kata_policy).
args_ok(args, c) if {
	count(args) == count(c.args)
	every i, expected in c.args {
		arg_ok(args[i], expected, c.arg_patterns[i])
	}
}

arg_ok(actual, expected, pattern) if {
	pattern == null
	actual == expected
}

arg_ok(actual, expected, pattern) if {
	pattern != null
	regex.match(pattern, actual)
}

namespace_ok(annotations) if {
	policy_data.namespace == ""
}

namespace_ok(annotations) if {
	annotations["io.kubernetes.cri.sandbox-namespace"] == policy_data.namespace
}

empty(value) if {
	value == null
}

empty(value) if {
	value == ""
}

empty(value) if {
	is_array(value)
	count(value) == 0
}

empty(value) if {
	is_object(value)
	count(value) == 0
}

hooks_ok(oci) if {
	empty(object.get(oci, "Hooks", null))
}

hooks_ok(oci) if {
	every _, hooks in oci.Hooks {
		empty(hooks)
	}
}

# No devices, no sysctls, and the runtime's masked paths in place (a privileged container has
# none).
linux_ok(linux) if {
	empty(object.get(linux, "Devices", []))
	empty(object.get(linux, "Sysctl", {}))
	"/proc/kcore" in linux.MaskedPaths
}

process_ok(process, c) if {
	process.Cwd == c.cwd
	not process.Terminal
	process.User.UID == c.uid
	process.User.GID == c.gid
	process.NoNewPrivileges == c.no_new_privileges
	every set_name in ["Ambient", "Bounding", "Effective", "Inheritable", "Permitted"] {
		every cap in object.get(process.Capabilities, set_name, []) {
			cap in c.capabilities
		}
	}
}

env_ok(env, c) if {
	every entry in env {
		env_entry_allowed(entry, c)
	}
	every entry in c.env {
		entry in env
	}
}

env_entry_allowed(entry, c) if {
	entry in c.env
}

env_entry_allowed(entry, c) if {
	some pattern in policy_data.env_patterns
	regex.match(pattern, entry)
}

mount_ok(mount, c) if {
	standard_mount(mount)
}

mount_ok(mount, c) if {
	some allowed in c.mounts
	mount.destination == allowed.destination
	mount.type_ == "bind"
	regex.match(allowed.source, mount.source)
	not contains(mount.source, "..")
	read_only_ok(mount.options, allowed.read_only)
}

read_only_ok(options, read_only) if {
	read_only
	"ro" in options
}

read_only_ok(options, read_only) if {
	not read_only
	not "ro" in options
}

standard_mount(mount) if {
	some allowed in policy_data.standard_mounts
	mount.destination == allowed.destination
	mount.type_ == allowed.type
	regex.match(allowed.source, mount.source)
	not contains(mount.source, "..")
}

storages_ok(storages, c) if {
	count([s | some s in storages; s.driver == "image_guest_pull"]) == 1
	every storage in storages {
		storage_ok(storage, c)
	}
}

storage_ok(storage, c) if {
	storage.driver == "image_guest_pull"
	storage.source == c.image
}

storage_ok(storage, c) if {
	storage.driver in ["ephemeral", "local"]
	some name in c.empty_dirs
	endswith(storage.mount_point, concat("", ["/", name]))
	not contains(storage.mount_point, "..")
}
"""
