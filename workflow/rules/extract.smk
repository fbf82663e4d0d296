# Face crops: one job per video (detection) or per chunk of an image source (given boxes).
VIDEO_SOURCES = [n for n, s in SOURCES.items() if s["kind"] in VIDEO_KINDS]
IMAGE_SOURCES = [n for n, s in SOURCES.items() if s["kind"] in IMAGE_KINDS]


rule extract_video_faces:
    input:
        video=video_path,
        # after the index: it stops the run on missing or unusable videos before any is extracted
        # (ancient: a new manifest alone, e.g. corrected labels, does not rerun the extraction)
        manifest=ancient(f"{RESULTS}/manifest/{{source}}.parquet"),
    output:
        tar=f"{RESULTS}/faces/{{source}}/{{unit}}.tar",
        table=f"{RESULTS}/faces/{{source}}/{{unit}}.parquet",
    wildcard_constraints:
        source=_alternatives(VIDEO_SOURCES),
    params:
        mode=extract_mode,
        persons=person_args,
        content=lambda wc: content_param([video_path(wc)], whole=False),  # size + first and last MiB
        settings=extract_settings,
        code=code_version("extract"),
        **keyed_params("extract", config["extract"], lambda wc: config["extract"]),
    log:
        "logs/extract_video_faces/{source}/{unit}.log",
    threads: 1
    resources:
        # from the measurements of bench/scale.py: time per frame of the video, flat memory (common.smk)
        mem_mb=extract_mem_mb,
        disk_mb=extract_disk_mb,
        runtime=extract_runtime,
        gpu=lambda wc: 0 if SOURCES[wc.source].get("cropped_aligned") else uses_gpu_detector(),
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "python -m ferflow.extract {params.mode} --video {input.video:q} {params.persons}"
        " --settings {params.settings:q} --out-tar {output.tar:q} --out-table {output.table:q} > {log:q} 2>&1"


rule extract_image_faces:
    input:
        manifest=f"{RESULTS}/manifest/{{source}}.parquet",
    output:
        tar=f"{RESULTS}/faces/{{source}}/{{unit}}.tar",
        table=f"{RESULTS}/faces/{{source}}/{{unit}}.parquet",
    wildcard_constraints:
        source=_alternatives(IMAGE_SOURCES),
        unit=r"chunk\d{3}",
    params:
        settings=extract_settings,
        code=code_version("extract"),
        **keyed_params("extract", config["extract"], lambda wc: config["extract"]),
    log:
        "logs/extract_image_faces/{source}/{unit}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "python -m ferflow.extract images --manifest {input.manifest:q} --unit {wildcards.unit:q}"
        " --settings {params.settings:q} --out-tar {output.tar:q} --out-table {output.table:q} > {log:q} 2>&1"
