//! What popular clients print when loopguard refuses them (EPERM), as the
//! README's table quotes it: each row is checked against the real client.

use std::path::Path;

use loopguard_tests::{users, Sandbox};

/// (client, argv with PORT for the port, what the README says it prints).
const CLIENTS: &[(&str, &[&str], &str)] = &[
    (
        "redis-cli",
        &[
            "/usr/bin/redis-cli",
            "-h",
            "127.0.0.1",
            "-p",
            "PORT",
            "PING",
        ],
        "Could not connect to Redis at 127.0.0.1:PORT: Operation not permitted",
    ),
    (
        "psql",
        &[
            "/usr/bin/psql",
            "-h",
            "127.0.0.1",
            "-p",
            "PORT",
            "-U",
            "x",
            "-d",
            "x",
            "-c",
            "",
        ],
        "port PORT failed: Operation not permitted",
    ),
    (
        "curl",
        &["/usr/bin/curl", "-sS", "http://127.0.0.1:PORT/"],
        "Couldn't connect to server",
    ),
    (
        "python",
        &[
            "/usr/bin/python3",
            "-c",
            "import socket; socket.create_connection(('127.0.0.1', PORT))",
        ],
        "PermissionError: [Errno 1] Operation not permitted",
    ),
];

#[test]
fn what_clients_print_when_refused_is_what_the_readme_says() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    let u = users();
    let sb = Sandbox::new("clients");
    let port = "6393";
    sb.apply_text(&format!(
        "version = 1\n[[service]]\nname = \"db\"\nport = {port}\nallow_users = [\"{}\"]\n",
        u.alice.name
    ));
    for (client, argv, says) in CLIENTS {
        assert!(
            Path::new(argv[0]).exists(),
            "{} IS NOT INSTALLED: `cargo xtask setup` installs it",
            argv[0]
        );
        let argv: Vec<String> = argv.iter().map(|a| a.replace("PORT", port)).collect();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let r = sb.exec_as(Some(&u.bob), &argv);
        let out = format!("{}{}", r.stdout, r.stderr);
        let expected = says.replace("PORT", port);
        assert!(
            out.contains(&expected),
            "{client} printed {out:?}, the README says {expected:?}"
        );
        // The README quotes it (with the client's usual port).
        assert!(
            says.split("PORT").all(|piece| readme.contains(piece)),
            "the README's client table lacks {client}'s {says:?}"
        );
    }
}
